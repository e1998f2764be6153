"""Guest time: nanoseconds that advance with the host's monotonic clock except while paused.

Every platform model takes time as an argument (`now_ns`) or through a `clock()`
callable returning guest ns; `VirtualClock` is that callable for a real machine and a
fake (any function returning an int) is that callable in tests.

The guest TSC is derived from guest time at a fixed frequency, TSC 0 at guest time 0:

    tsc = floor(ns * tsc_hz / 1e9)          ns_from_tsc(t) = ceil(t * 1e9 / tsc_hz)

`ns_from_tsc` rounds up so that `tsc_from_ns(ns_from_tsc(t), hz) >= t`: a TSC-deadline
timer armed for `t` fires at the first guest nanosecond at which the TSC has reached `t`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Final

from ..persist import require
from .clock_state import ClockState

log = logging.getLogger(__name__)

NS_PER_SECOND: Final = 1_000_000_000
DEFAULT_TSC_HZ: Final = 1_000_000_000  # 1 GHz: TSC ticks are guest nanoseconds


def tsc_from_ns(ns: int, tsc_hz: int) -> int:
    """The TSC value at guest time `ns`."""
    return ns * tsc_hz // NS_PER_SECOND


def ns_from_tsc(tsc: int, tsc_hz: int) -> int:
    """The first guest ns at which the TSC reads at least `tsc`."""
    return -(-tsc * NS_PER_SECOND // tsc_hz)


class VirtualClock:
    """Guest time in ns, from `time_source` (host `time.monotonic_ns` unless a test injects one).

    Guest time starts at 0 when the clock is created, stands still between `pause()` and
    `resume()`, and continues from a saved value after `restore()`. Calling the clock
    (`clock()`) is `now_ns()`, so it can be handed to the models as their clock. Safe to
    use from any thread."""

    def __init__(self, tsc_hz: int = DEFAULT_TSC_HZ, *,
                 time_source: Callable[[], int] = time.monotonic_ns, start_paused: bool = False) -> None:
        if tsc_hz <= 0:
            raise ValueError(f"TSC frequency must be positive, got {tsc_hz}")
        self.tsc_hz = tsc_hz
        self._time_source = time_source
        self._lock = threading.Lock()
        # guest_ns = host_ns - _offset while running; frozen at _paused_at while paused.
        host = time_source()
        self._offset = host
        self._paused_at: int | None = 0 if start_paused else None

    def now_ns(self) -> int:
        with self._lock:
            return self._now_locked()

    def __call__(self) -> int:
        return self.now_ns()

    def _now_locked(self) -> int:
        if self._paused_at is not None:
            return self._paused_at
        return self._time_source() - self._offset

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused_at is not None

    def pause(self) -> None:
        """Freeze guest time (no-op if already paused)."""
        with self._lock:
            if self._paused_at is None:
                self._paused_at = self._now_locked()

    def resume(self) -> None:
        """Let guest time run again from where it stood (no-op if running)."""
        with self._lock:
            if self._paused_at is not None:
                self._offset = self._time_source() - self._paused_at
                self._paused_at = None

    def tsc(self, now_ns: int | None = None) -> int:
        """The guest TSC at `now_ns` (default: now)."""
        return tsc_from_ns(self.now_ns() if now_ns is None else now_ns, self.tsc_hz)

    def ns_from_tsc(self, tsc: int) -> int:
        """The first guest ns at which the TSC reads at least `tsc`."""
        return ns_from_tsc(tsc, self.tsc_hz)

    def save(self) -> ClockState:
        with self._lock:
            return ClockState(now_ns=self._now_locked(), tsc_hz=self.tsc_hz, paused=self._paused_at is not None)

    def restore(self, state: ClockState) -> None:
        """Continue guest time from the saved value (paused if it was saved paused): the guest
        sees no time pass while it was saved."""
        state = require(state, ClockState)
        with self._lock:
            self.tsc_hz = state.tsc_hz
            if state.paused:
                self._paused_at = state.now_ns
            else:
                self._paused_at = None
                self._offset = self._time_source() - state.now_ns
