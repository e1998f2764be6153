"""The 8259A pair's saved state (a module of its own: the PIC is compiled, see pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..persist import State

# A chip's initialization sequence: ready, or waiting for ICW2, ICW3 or ICW4 (PicChipState.init_state).
INIT_READY: Final = 0
INIT_ICW2: Final = 1
INIT_ICW3: Final = 2
INIT_ICW4: Final = 3


@dataclass(frozen=True)
class PicChipState(State):
    """One 8259A: request, service and mask registers, its initialization sequence and modes."""
    KIND = "i8259"
    irr: int
    isr: int
    imr: int
    vector_base: int
    priority_base: int
    init_state: int
    icw4_expected: bool
    single: bool
    level_mode: bool
    auto_eoi: bool
    rotate_on_auto_eoi: bool
    special_fully_nested: bool
    special_mask: bool
    read_isr: bool
    poll_pending: bool
    cascade_id: int
    elcr: int
    line_levels: int

    def validate(self) -> None:
        for name in ("irr", "isr", "imr", "vector_base", "cascade_id", "elcr", "line_levels"):
            self.check_range(name, 0, 0xFF)
        self.check_range("priority_base", 0, 7)
        self.check_range("init_state", INIT_READY, INIT_ICW4)


@dataclass(frozen=True)
class PicPairState(State):
    KIND = "i8259_pair"
    master: PicChipState
    slave: PicChipState
