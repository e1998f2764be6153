"""The IOAPIC's saved state (a module of its own: the IOAPIC is compiled, see pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..persist import State


@dataclass(frozen=True)
class IoApicState(State):
    """The ID and index registers, the input pins' levels and every redirection entry (remote IRR included)."""
    KIND = "ioapic"
    id: int
    select: int
    asserted: int
    redirection: tuple[int, ...]

    def validate(self) -> None:
        self.check_range("id", 0, 0xF)
        self.check_range("select", 0, 0xFF)
        self.check_range("asserted", 0, (1 << 64) - 1)
        self.check_items("redirection", 0, (1 << 64) - 1)
