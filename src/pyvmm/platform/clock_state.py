"""The guest clock's saved state (a module of its own: the clock is compiled, see pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..persist import State


@dataclass(frozen=True)
class ClockState(State):
    """Guest time when saved, the TSC rate it is read at, and whether it stood still."""
    KIND = "virtual_clock"
    now_ns: int
    tsc_hz: int
    paused: bool

    def validate(self) -> None:
        self.check_range("now_ns", 0, 1 << 64)
        self.check_range("tsc_hz", 1, 1 << 64)
