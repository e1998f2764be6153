"""SliceTimer: ends a vCPU's time slice from one persistent thread.

A slice is one `uc.emu_start` with no instruction limit (Unicorn implements a limit with a
callback before every instruction, which makes translated code about 3x slower). The
timer thread calls the slice's `stop` (EngineControl.request_stop) when its deadline
passes, and `kick()` stops the running slice at once from any thread (an interrupt was
raised, the VM must stop or pause). Unicorn honours the stop at the next translation-block
boundary: between two instructions (see engine_state.py).

A stop can be lost: one that arrives after `begin()` but before emu_start has reset the
engine's stop state is forgotten. So while a slice that was stopped is still running, the
thread repeats the stop every RETRY seconds from when it next wakes: at the slice's deadline
for a kick (the window is a few microseconds at a slice's start, and a slice is at most a
few milliseconds long). A kick does not wake the thread: it came with every interrupt a
device raised, and on a busy host each such wake-up preempted the thread running the guest
(about ten per KiB of guest->host TCP, issue 17).

Nor does a slice's begin(), unless its deadline comes well before the thread's next wake-up
(LATE_ENOUGH: slices often share the deadline of the next timer interrupt, computed anew each
time): between slices the thread sleeps on to the last slice's deadline, so when slices end
early (a HLT, an I/O exit, a kick) it wakes about once per deadline, not twice per slice
(event_costs.py: 1.7 wake-ups per 4 KiB disk request before).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

RETRY = 0.001
LATE_ENOUGH = 0.0001  # a slice may end this much after its deadline rather than wake the thread


class SliceTimer:
    def __init__(self) -> None:
        # begin() and end() run at every slice: they take the bare lock (C, no frames); only
        # a notify needs the condition, which is built on that lock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop: Callable[[], None] | None = None  # stops the running slice; None between slices
        self._deadline = 0.0        # time.monotonic() at which the slice ends
        self._stopped = False       # stop() was called for the running slice
        self.expired = False        # ... because its deadline passed (not a kick)
        self._repeat_at = 0.0       # when to repeat that stop if the slice has not returned by then
        self._sleeping_until = math.inf
        self._closed = False
        self._thread: threading.Thread | None = None

    def begin(self, stop: Callable[[], None], seconds: float) -> None:
        """A slice is about to start; `stop()` (callable from any thread) ends it after `seconds`."""
        deadline = time.monotonic() + seconds
        with self._lock:
            self._stop, self._deadline, self._stopped, self.expired = stop, deadline, False, False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tcg-slice-timer", daemon=True)
                self._thread.start()
            elif deadline < self._sleeping_until - LATE_ENOUGH:
                self._cond.notify()

    def end(self) -> bool:
        """The slice returned; True if it was stopped (by its deadline or a kick; `expired`
        says which)."""
        with self._lock:
            self._stop = None
            return self._stopped

    def kick(self) -> None:
        """End the running slice, if any, as soon as possible (any thread). The thread is left
        asleep: it repeats a stop that may have been lost when it wakes for the deadline."""
        with self._lock:
            if self._stop is not None and not self._stopped:
                self._stop_locked()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._stop = None
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _stop_locked(self) -> None:
        stop = self._stop
        assert stop is not None  # callers hold the lock and checked that a slice runs
        self._stopped = True
        self._repeat_at = max(self._deadline, time.monotonic() + RETRY)
        stop()

    def _run(self) -> None:
        cond = self._cond
        with cond:
            while not self._closed:
                now = time.monotonic()
                if self._stop is None:
                    # Between slices: sleep on to the last slice's deadline, not until the next
                    # begin(), which then need not wake the thread (most slices end early)
                    self._sleeping_until = self._deadline if now < self._deadline else math.inf
                    cond.wait(self._deadline - now if now < self._deadline else None)
                    continue
                if self._stopped:  # not returned yet: the stop may have been lost, repeat it
                    if now >= self._repeat_at:
                        self._stop()
                        self._repeat_at = now + RETRY
                    self._sleeping_until = self._repeat_at
                    cond.wait(self._repeat_at - now)
                    continue
                if now >= self._deadline:
                    self.expired = True
                    self._stop_locked()
                    continue
                self._sleeping_until = self._deadline
                cond.wait(self._deadline - now)
