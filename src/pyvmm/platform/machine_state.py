"""The software platform's saved state (a module of its own: the platform is compiled, see
pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..persist import State
from .clock_state import ClockState
from .ioapic_state import IoApicState
from .lapic_state import LapicState
from .pic_state import PicPairState
from .pit_state import PitState


@dataclass(frozen=True)
class SoftwarePlatformState(State):
    """The software CPU's machine: guest clock, 8259 pair, PIT, IOAPIC and one LAPIC per vCPU."""
    KIND = "software_platform"
    clock: ClockState
    pic: PicPairState
    pit: PitState
    ioapic: IoApicState
    lapics: tuple[LapicState, ...]
