"""Throttle: a virtio device's rate limiter and the refill timer that resumes its deferred work.

The device asks before each request (`admit` with the cost, or `ready` when the cost is known
only afterwards, then `charge`). A refusal arms one timer, at the moment the refused request
would be allowed, and the device stops taking requests from that queue (they stay in the
guest's ring, nothing is dropped). When the timer fires, `resume` is called under the device
lock and the device serves the queue again. No polling: while throttled the device does
nothing until the timer, whatever the guest kicks.
"""

from __future__ import annotations

import time
from typing import Callable

from ...errors import PyvmmError
from ..rate_limiter import Clock, RateLimit, RateLimiter, RateLimiterState, TimerHandle, Timers


class ThrottleError(PyvmmError, ValueError):
    """A rate limit was asked of a device that has no timers to resume deferred work."""


class Throttle:
    def __init__(self, lock, resume: Callable[[], None], timers: Timers | None = None,
                 limit: RateLimit | None = None, clock: Clock = time.monotonic_ns) -> None:
        self._lock = lock
        self._resume = resume
        self._timers = timers
        self._clock = clock
        self._timer: TimerHandle | None = None
        self.limiter: RateLimiter | None = None
        self.deferrals = 0      # how often a request had to wait (a counter for stats)
        self.set_limit(limit)

    @property
    def limit(self) -> RateLimit | None:
        return None if self.limiter is None else self.limiter.limit

    @property
    def blocked(self) -> bool:
        """Waiting for the refill timer: take no request until it fires."""
        return self._timer is not None

    def admit(self, nbytes: int, ops: int = 1) -> bool:
        """May a request of this cost go now? If not, the refill timer is armed (caller: defer it)."""
        limiter = self.limiter
        if limiter is None:
            return True
        if self._timer is None and limiter.consume(nbytes, ops):
            return True
        self._defer(limiter.wait_ns(nbytes, ops))
        return False

    def ready(self) -> bool:
        """May a request whose cost is known only once done start now? (charge() it after.)"""
        limiter = self.limiter
        if limiter is None:
            return True
        if self._timer is None and limiter.ready():
            return True
        self._defer(limiter.wait_ns(1, 1))
        return False

    def charge(self, nbytes: int, ops: int = 1) -> None:
        if self.limiter is not None:
            self.limiter.charge(nbytes, ops)

    def _defer(self, delay_ns: int) -> None:
        if self._timer is None:
            assert self._timers is not None  # set_limit refuses a limit without timers
            self.deferrals += 1
            self._timer = self._timers.call_later(max(delay_ns, 1), self._fire)

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            self._resume()

    def set_limit(self, limit: RateLimit | None) -> None:
        """A new limit, its buckets full (Firecracker's PATCH does the same); work deferred under
        the old one is looked at again right away (on the timers' thread)."""
        if limit is not None and not limit.unlimited and self._timers is None:
            raise ThrottleError("this device has no timer to resume throttled requests")
        with self._lock:
            self.limiter = None if limit is None or limit.unlimited else RateLimiter(limit, self._clock)
            self._restart()

    def _restart(self) -> None:
        was_blocked = self.cancel()
        if was_blocked and self._timers is not None:
            self._timer = self._timers.call_later(0, self._fire)

    def cancel(self) -> bool:
        """Forget the refill timer (a device reset); True if one was armed."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        return timer is not None

    def save(self) -> RateLimiterState | None:
        with self._lock:
            return None if self.limiter is None else self.limiter.save()

    def restore(self, state: RateLimiterState | None, *, resume: bool) -> None:
        """The limit and bucket levels of a saved device; with `resume` the device looks at its
        queues once the timers run (requests deferred at the save are still in the ring)."""
        if state is not None and self._timers is None:
            raise ThrottleError("this device has no timer to resume throttled requests")
        with self._lock:
            self.cancel()
            self.limiter = None if state is None else RateLimiter.from_state(state, self._clock)
            if resume and self._timers is not None:
                self._timer = self._timers.call_later(0, self._fire)
