"""The local APIC's save/restore, mixed into LocalApic (a trait: mypyc compiles LocalApic,
see pyvmm/compiled.py, and a compiled class has one base class plus traits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..compiled import trait
from ..persist import require
from .lapic_state import SAVED_REGISTERS, LapicState

if TYPE_CHECKING:
    from typing import Callable

    from .apic_bus import PlatformLock


@trait
class LapicPersist:
    _lock: PlatformLock
    _id: int
    _apic_base: int
    _lvt: list[int]
    _startup_events: list[tuple]
    _irr: int
    _nmi_pending: bool
    on_wakeup: Callable[[], None] | None

    def save(self) -> LapicState:
        with self._lock:
            return LapicState(apic_id=self._id, apic_base=self._apic_base, lvt=tuple(self._lvt),  # type: ignore[arg-type]
                              startup_events=tuple((str(e[0]), int(e[1]) if len(e) > 1 else 0)
                                                   for e in self._startup_events),
                              **{name: getattr(self, "_" + name) for name in SAVED_REGISTERS})

    def restore(self, state: LapicState) -> None:
        """Load every register; the timer continues from its saved guest-time base (the guest
        clock is restored with it), and the CPU is woken if something waits for it."""
        state = require(state, LapicState)
        with self._lock:
            self._id, self._apic_base, self._lvt = state.apic_id, state.apic_base, list(state.lvt)
            for name in SAVED_REGISTERS:
                setattr(self, "_" + name, getattr(state, name))
            self._startup_events = [("init",) if kind == "init" else (kind, vector)
                                    for kind, vector in state.startup_events]
            if self._irr or self._nmi_pending or self._startup_events:
                self._lock.defer(self.on_wakeup)
