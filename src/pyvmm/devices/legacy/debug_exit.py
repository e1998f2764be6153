"""QEMU's isa-debug-exit convention: a guest ends the VM with an exit status of its choice.

pyvmm registers it at port 0xf4 with length 4 (QEMU's `iobase=0xf4,iosize=4`), so
`outb`, `outw` and `outl` all work. A write of value V (little endian, any offset in
the range) ends the VM with exit status `exit_status(V)` = (V << 1) | 1: always odd,
so a test harness can tell a deliberate exit from pyvmm's own status 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ...persist import State

log = logging.getLogger(__name__)

PORT = 0xF4
PORT_COUNT = 4


def exit_status(value: int) -> int:
    """The process exit status for a debug-exit write of `value`: (value << 1) | 1.

    Not masked: a shell sees it modulo 256 (writing 0x7f gives 255, 0x80 gives 1)."""
    return (value << 1) | 1


class DebugExitPort:
    """Calls `on_exit(value)` for every write; reads return all-ones. Stateless."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = int.from_bytes(data, "little")
        log.debug("debug-exit: guest wrote %#x (exit status %d)", value, exit_status(value))
        self._on_exit(value)

    def save(self) -> DebugExitState:
        return DebugExitState()

    def restore(self, state: DebugExitState) -> None:
        pass


@dataclass(frozen=True)
class DebugExitState(State):
    """Writes only report: the state is empty, its kind and version checked."""
    KIND = "debug_exit"
