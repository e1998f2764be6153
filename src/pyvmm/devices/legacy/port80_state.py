"""Port80's saved state, apart from the device (compiled modules keep their saved-state
dataclasses in modules of their own: pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ...persist import State


@dataclass(frozen=True)
class Port80State(State):
    KIND = "port80"
    last_value: int
    writes: int

    def validate(self) -> None:
        self.check_range("last_value", 0, 0xFF)
        if self.writes < 0:
            self.fail("writes", f"{self.writes} is negative")
