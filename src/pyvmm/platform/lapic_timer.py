"""The local APIC timer: one-shot, periodic and TSC-deadline modes, mixed into LocalApic
(a trait: mypyc compiles LocalApic, see pyvmm/compiled.py).

Counts down at `timer_hz` (the bus clock) divided by the divide configuration; TSC-deadline
mode compares against the guest TSC derived from guest time at `tsc_hz`. Missed periodic
expiries are coalesced: `poll` delivers at most one per call. Register state lives on the
LocalApic (`_lvt`, `_timer_*`, `_tsc_deadline`); these methods run with the APIC bus lock held
unless they take it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..compiled import trait
from .clock import NS_PER_SECOND
from .clock import ns_from_tsc as _ns_from_tsc
from .lapic_registers import LVT_MASKED, LVT_TIMER, TIMER_PERIODIC, TIMER_TSC_DEADLINE

if TYPE_CHECKING:
    from typing import Callable

    from .apic_bus import PlatformLock


@trait
class LapicTimer:
    _lvt: list[int]
    _timer_initial: int
    _timer_divide: int
    _timer_start_ns: int
    _timer_next_ns: int | None
    _tsc_deadline: int
    _clock: Callable[[], int]
    _lock: PlatformLock
    timer_hz: int
    tsc_hz: int

    def _accept_vector(self, vector: int, level_triggered: bool) -> None:
        """The LocalApic's: the timer's LVT vector goes to IRR (a trait declares the methods it calls)."""
        raise NotImplementedError

    def _timer_mode(self) -> int:
        return (self._lvt[LVT_TIMER] >> 17) & 3

    def _timer_divisor(self) -> int:
        code = (self._timer_divide & 3) | ((self._timer_divide >> 1) & 4)
        return 1 << ((code + 1) & 7)

    def _counts_in(self, ns: int) -> int:
        return ns * self.timer_hz // (NS_PER_SECOND * self._timer_divisor())

    def _ns_for_counts(self, counts: int) -> int:
        return -(-counts * NS_PER_SECOND * self._timer_divisor() // self.timer_hz)

    def _timer_current(self, now: int) -> int:
        if self._timer_mode() == TIMER_TSC_DEADLINE or not self._timer_initial:
            return 0
        elapsed = self._counts_in(max(0, now - self._timer_start_ns))
        if self._timer_mode() == TIMER_PERIODIC:
            return self._timer_initial - elapsed % self._timer_initial
        return max(0, self._timer_initial - elapsed)

    def _write_timer_initial(self, value: int) -> None:
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            return  # the initial count is ignored in TSC-deadline mode
        now = self._clock()
        self._timer_initial = value & 0xFFFFFFFF
        self._timer_start_ns = now
        self._timer_next_ns = now + self._ns_for_counts(self._timer_initial) if self._timer_initial else None

    def _write_timer_divide(self, value: int) -> None:
        now = self._clock()
        self._timer_update(now)
        counting = self._timer_next_ns is not None and self._timer_mode() != TIMER_TSC_DEADLINE
        current = self._timer_current(now) if counting else 0
        self._timer_divide = value & 0xB
        if counting:
            # Keep the current count; it decrements at the new rate from here.
            self._timer_start_ns = now - self._ns_for_counts(self._timer_initial - current)
            self._timer_next_ns = self._timer_start_ns + self._ns_for_counts(self._timer_initial)

    def _timer_deadline_ns(self) -> int | None:
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            return _ns_from_tsc(self._tsc_deadline, self.tsc_hz) if self._tsc_deadline else None
        return self._timer_next_ns

    def _timer_update(self, now: int) -> None:
        """Fire the timer if it has expired by `now` (one interrupt at most)."""
        deadline = self._timer_deadline_ns()
        if deadline is None or now < deadline:
            return
        mode = self._timer_mode()
        if mode == TIMER_TSC_DEADLINE:
            self._tsc_deadline = 0
        elif mode == TIMER_PERIODIC:
            elapsed = self._counts_in(now - self._timer_start_ns)
            periods = elapsed // self._timer_initial + 1
            self._timer_next_ns = self._timer_start_ns + self._ns_for_counts(periods * self._timer_initial)
        else:
            self._timer_next_ns = None
        lvt = self._lvt[LVT_TIMER]
        if not lvt & LVT_MASKED:
            self._accept_vector(lvt & 0xFF, False)

    # Both run between every two slices of the software CPU. Only the CPU loop's own thread
    # changes the timer (register writes, restores while paused), so a look needs no lock.

    def poll(self, now_ns: int) -> None:
        """Deliver a timer interrupt due by `now_ns` (missed periods are coalesced into one)."""
        deadline = self._timer_deadline_ns()
        if deadline is None or now_ns < deadline:
            return
        with self._lock:
            self._timer_update(now_ns)

    def next_deadline_ns(self, now_ns: int | None = None) -> int | None:
        """Guest ns of the next timer interrupt, or None if the timer is idle or masked."""
        if self._lvt[LVT_TIMER] & LVT_MASKED:
            return None
        return self._timer_deadline_ns()
