"""pvpanic: the guest kernel tells the VMM it panicked (QEMU's pvpanic ISA device).

One port (ACPI device QEMU0001, announced in the DSDT); Linux's pvpanic driver writes
bit 0 (PANICKED) from its panic notifier, before any reboot, so a panic is reported as
a panic and not mistaken for a reboot. Reads return the events pyvmm supports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ...persist import State

log = logging.getLogger(__name__)

PANICKED = 1 << 0
CRASH_LOADED = 1 << 1


class PvPanic:
    def __init__(self, on_panic: Callable[[], None]) -> None:
        self._on_panic = on_panic

    def read(self, offset: int, size: int) -> bytes:
        return bytes([PANICKED | CRASH_LOADED]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        events = data[0] if data else 0
        if events & PANICKED:
            log.info("pvpanic: the guest kernel panicked")
            self._on_panic()
        elif events & CRASH_LOADED:
            log.info("pvpanic: the guest kernel crashed and loaded a crash kernel")

    def save(self) -> PvPanicState:
        return PvPanicState()

    def restore(self, state: PvPanicState) -> None:
        pass


@dataclass(frozen=True)
class PvPanicState(State):
    """Reads are constant and writes only report: the state is empty, its kind and version checked."""
    KIND = "pvpanic"
