"""The hardware-reduced ACPI sleep and reset registers pyvmm's FADT points at.

Three 8-bit ports (layout.ACPI_SLEEP_CONTROL_PORT .. ACPI_RESET_PORT):
  +0 sleep control: writing SLP_EN (bit 5) with SLP_TYP 5 (bits 2-4) powers the machine off
     (Linux writes 0x34 after running \\_S5); other values are ignored;
  +1 sleep status: reads 0 (a wake never happened), writes ignored;
  +2 reset: writing the FADT's RESET_VALUE resets the machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ...persist import State

log = logging.getLogger(__name__)

SLP_EN = 1 << 5
SLEEP_TYPE_SHIFT = 2
SLEEP_TYPE_S5 = 5
PORT_COUNT = 3


class AcpiPower:
    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None], reset_value: int) -> None:
        self._on_poweroff, self._on_reset, self._reset_value = on_poweroff, on_reset, reset_value

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        value = data[0] if data else 0
        if offset == 0 and value & SLP_EN and (value >> SLEEP_TYPE_SHIFT) & 7 == SLEEP_TYPE_S5:
            log.info("guest entered ACPI S5: power off")
            self._on_poweroff()
        elif offset == 2 and value == self._reset_value:
            log.info("guest wrote the ACPI reset register")
            self._on_reset()

    def save(self) -> AcpiPowerState:
        return AcpiPowerState()

    def restore(self, state: AcpiPowerState) -> None:
        pass


@dataclass(frozen=True)
class AcpiPowerState(State):
    """The sleep and reset registers keep nothing: the state is empty, its kind and version checked."""
    KIND = "acpi_power"
