"""DeadlineTimer: one thread that calls a device back when the host clock reaches a deadline.

The software CPU's scheduler serves the timers of its own platform models (PIT, LAPIC) and
KVM serves its in-kernel ones; a device model that needs time to pass without the guest
touching it (the RTC's update and alarm interrupts) gets one of these on either accelerator.
The device arms it with a deadline on the same clock (`time.time_ns` unless told otherwise)
and is called back once, on the timer's thread, at or after that deadline. While the VM is
paused (`pause()`/`resume()`) the timer calls nothing back: a deadline that passed meanwhile
calls back once, on resume.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class DeadlineTimer:
    def __init__(self, callback: Callable[[], None], *, clock: Callable[[], int] = time.time_ns,
                 name: str = "pyvmm-timer", on_error: Callable[[BaseException], None] | None = None) -> None:
        self._callback = callback
        self._clock = clock
        self.name = name
        self.on_error = on_error
        self._cond = threading.Condition()
        self._deadline: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._paused = False
        self._calling = False  # the callback is running (outside the lock)

    def arm(self, deadline_ns: int | None) -> None:
        """Call back once at `deadline_ns` (replacing any earlier deadline); None cancels.
        Never calls back from here, so a device may arm it under its own lock."""
        with self._cond:
            if self._closed:
                return
            self._deadline = deadline_ns
            if deadline_ns is not None and self._thread is None:
                # Started on first use: a guest that never asks for interrupts costs no thread.
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def pause(self) -> None:
        """Return once no callback runs, and call none back until resume()."""
        with self._cond:
            self._paused = True
            while self._calling and self._thread is not threading.current_thread():
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        """Stop and join the thread; later arm() calls are ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None or self._paused:
                    self._cond.wait()
                    continue
                remaining = self._deadline - self._clock()
                if remaining > 0:
                    self._cond.wait(remaining / 1e9)
                    continue
                self._deadline = None
                self._calling = True
                # The device takes its lock in the callback and arms the timer under it.
                self._cond.release()
                try:
                    self._callback()
                except BaseException as exc:  # a device model failed: report it, do not vanish
                    log.debug("%s: callback failed", self.name, exc_info=True)
                    if self.on_error is not None:
                        self.on_error(exc)
                    return
                finally:
                    self._cond.acquire()
                    self._calling = False
                    self._cond.notify_all()  # a pause() waiting for the callback to end
