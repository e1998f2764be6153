"""Token-bucket rate limiters for device I/O (Firecracker's `rate_limiter`), pure and clock-injected.

A bucket holds up to `size` tokens (bytes, or operations) and refills at `size` tokens per
`refill_time` milliseconds; `one_time_burst` tokens come on top once, are spent first and
never come back. It starts full. A `RateLimiter` pairs a bandwidth bucket and an ops bucket
(either may be absent: no limit on that).

How a device uses it:

- a request whose cost is known before it is carried out (a block request, a frame to
  transmit) goes when `consume(bytes, ops)` says so: every bucket has min(cost, size) tokens.
  A request bigger than the bucket (a 1 MiB write under a 512 KiB bucket) goes once the
  bucket is full and leaves it in debt: the budget goes below zero and the next request
  waits until it is paid back, so the average rate holds whatever the request sizes;
- a request whose cost is known only afterwards (a received frame) starts when `ready()`
  and is `charge()`d once done, which may also leave a debt;
- when refused, the device defers the request (it stays in the ring) and asks to be called
  back after `wait_ns(bytes, ops)`: the time until the refused request would go.

Arithmetic is exact: refill is counted in token-nanoseconds and the remainder carried over,
so tokens granted over any span are floor(span * size / refill_time) and nothing is lost to
rounding however often the clock is read. The clock returns nanoseconds (monotonic).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..errors import ConfigError
from ..persist import State

NS_PER_MS = 1_000_000
MAX_TOKENS = (1 << 63) - 1      # Firecracker's fields are int64
MAX_REFILL_MS = (1 << 63) // NS_PER_MS

Clock = Callable[[], int]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """Where a device's deferred work is called back (the I/O thread implements it)."""

    def call_later(self, delay_ns: int, callback: Callable[[], None]) -> TimerHandle: ...


@dataclass(frozen=True)
class TokenBucketConfig(State):
    """Firecracker's TokenBucket object: size tokens, refilled over refill_time ms, plus a one-time burst."""
    KIND = "token-bucket"
    size: int
    refill_time: int
    one_time_burst: int = 0

    def validate(self) -> None:
        self.check_range("size", 1, MAX_TOKENS)
        self.check_range("refill_time", 1, MAX_REFILL_MS)
        self.check_range("one_time_burst", 0, MAX_TOKENS)

    def to_api(self) -> dict[str, int]:
        return {"size": self.size, "one_time_burst": self.one_time_burst, "refill_time": self.refill_time}


@dataclass(frozen=True)
class RateLimit(State):
    """Firecracker's RateLimiter object: a bandwidth bucket (bytes) and an ops bucket (requests or packets)."""
    KIND = "rate-limit"
    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None

    @property
    def unlimited(self) -> bool:
        return self.bandwidth is None and self.ops is None

    def to_api(self) -> dict[str, Any]:
        return {name: bucket.to_api() for name, bucket in (("bandwidth", self.bandwidth), ("ops", self.ops))
                if bucket is not None}

    @classmethod
    def from_api(cls, value: Any, field: str) -> "RateLimit | None":
        """The API's / a definition's rate_limiter object (None or {} is no limit). A bucket with
        size or refill_time 0 is no limit on that, as in Firecracker. ConfigError names the field."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"must be an object with bandwidth and/or ops (got {value!r:.60})", field)
        for key in value:
            if key not in ("bandwidth", "ops"):
                raise ConfigError("is not a known field (known: bandwidth, ops)", f"{field}.{key}")
        buckets = {name: _bucket_from_api(value.get(name), f"{field}.{name}") for name in ("bandwidth", "ops")}
        limit = cls(**buckets)
        return None if limit.unlimited else limit

    @classmethod
    def per_second(cls, bytes_per_s: int | None = None, ops_per_s: int | None = None) -> "RateLimit | None":
        """The compact form: so many bytes and/or operations per second (a one-second bucket)."""
        def bucket(rate: int | None) -> TokenBucketConfig | None:
            return TokenBucketConfig(rate, 1000) if rate else None
        limit = cls(bucket(bytes_per_s), bucket(ops_per_s))
        return None if limit.unlimited else limit


def _bucket_from_api(value: Any, field: str) -> TokenBucketConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"must be an object with size, refill_time and one_time_burst (got {value!r:.60})", field)
    known = ("size", "one_time_burst", "refill_time")
    for key in value:
        if key not in known:
            raise ConfigError(f"is not a known field (known: {', '.join(known)})", f"{field}.{key}")
    numbers = {}
    for key in known:
        if key not in value:
            if key == "one_time_burst":
                continue
            raise ConfigError("is required", f"{field}.{key}")
        number = value[key]
        if type(number) is not int:
            raise ConfigError(f"must be an integer (got {number!r:.60})", f"{field}.{key}")
        top = MAX_REFILL_MS if key == "refill_time" else MAX_TOKENS
        if not 0 <= number <= top:
            raise ConfigError(f"must be between 0 and {top} (got {number})", f"{field}.{key}")
        numbers[key] = number
    if numbers["size"] == 0 or numbers["refill_time"] == 0:
        return None
    return TokenBucketConfig(**numbers)


@dataclass(frozen=True)
class BucketLevel(State):
    """A bucket's level at a save: tokens (negative while in debt), one-time burst left, and the
    refill remainder in token-nanoseconds."""
    KIND = "token-bucket-level"
    budget: int
    burst: int
    credit: int

    def validate(self) -> None:
        self.check_range("budget", -MAX_TOKENS, MAX_TOKENS)
        self.check_range("burst", 0, MAX_TOKENS)
        self.check_range("credit", 0, MAX_TOKENS * NS_PER_MS * 1000)


@dataclass(frozen=True)
class RateLimiterState(State):
    KIND = "rate-limiter"
    limit: RateLimit
    bandwidth: BucketLevel | None
    ops: BucketLevel | None

    def validate(self) -> None:
        for name in ("bandwidth", "ops"):
            configured, level = getattr(self.limit, name), getattr(self, name)
            if (configured is None) != (level is None):
                self.fail(name, "a level must be saved exactly for each configured bucket")
            if configured is not None and level is not None and level.budget > configured.size:
                self.fail(f"{name}.budget", f"{level.budget} is more than the bucket's size {configured.size}")
            if configured is not None and level is not None and level.credit >= configured.refill_time * NS_PER_MS:
                self.fail(f"{name}.credit", "is a whole token or more")


class TokenBucket:
    def __init__(self, config: TokenBucketConfig, clock: Clock = time.monotonic_ns) -> None:
        self.config = config
        self.size = config.size
        self._refill_ns = config.refill_time * NS_PER_MS
        self._clock = clock
        self.budget = config.size            # tokens; negative while a large request is paid back
        self.burst = config.one_time_burst   # spent before the budget, never refilled
        self._credit = 0                     # refill not yet a whole token, in token-nanoseconds
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed, self._last = max(0, now - self._last), max(now, self._last)
        if self.budget >= self.size:
            self._credit = 0  # a full bucket gains nothing from waiting
            return
        tokens, self._credit = divmod(self._credit + elapsed * self.size, self._refill_ns)
        self.budget += tokens
        if self.budget >= self.size:
            self.budget, self._credit = self.size, 0

    def available(self) -> int:
        self._refill()
        return self.burst + self.budget

    def can_take(self, tokens: int) -> bool:
        return self.available() >= min(tokens, self.size)

    def take(self, tokens: int) -> None:
        """Spend `tokens`, the one-time burst first; the budget may go below zero (a debt)."""
        self._refill()
        from_burst = min(self.burst, tokens)
        self.burst -= from_burst
        self.budget -= tokens - from_burst

    def wait_ns(self, tokens: int) -> int:
        """Nanoseconds until can_take(tokens) (0 if it can now)."""
        missing = min(tokens, self.size) - self.available()
        if missing <= 0:
            return 0
        return -(-(missing * self._refill_ns - self._credit) // self.size)  # ceiling division

    def save(self) -> BucketLevel:
        self._refill()
        return BucketLevel(budget=self.budget, burst=self.burst, credit=self._credit)

    def restore(self, level: BucketLevel) -> None:
        self.budget, self.burst, self._credit = min(level.budget, self.size), level.burst, level.credit
        self._last = self._clock()


class RateLimiter:
    """A bandwidth bucket (bytes) and an ops bucket (operations), either optional."""

    def __init__(self, limit: RateLimit, clock: Clock = time.monotonic_ns) -> None:
        self.limit = limit
        self.bandwidth = TokenBucket(limit.bandwidth, clock) if limit.bandwidth is not None else None
        self.ops = TokenBucket(limit.ops, clock) if limit.ops is not None else None

    def _pairs(self, nbytes: int, ops: int) -> list[tuple[TokenBucket, int]]:
        return [(bucket, cost) for bucket, cost in ((self.bandwidth, nbytes), (self.ops, ops)) if bucket is not None]

    def consume(self, nbytes: int, ops: int = 1) -> bool:
        """Take the cost of a request if every bucket allows it now; False (nothing taken) if not."""
        pairs = self._pairs(nbytes, ops)
        if not all(bucket.can_take(cost) for bucket, cost in pairs):
            return False
        for bucket, cost in pairs:
            bucket.take(cost)
        return True

    def ready(self) -> bool:
        """Could a request of unknown size start (every bucket has a token)?"""
        return all(bucket.can_take(1) for bucket, _ in self._pairs(1, 1))

    def charge(self, nbytes: int, ops: int = 1) -> None:
        """Take the cost of a request already done (its size was known only afterwards)."""
        for bucket, cost in self._pairs(nbytes, ops):
            bucket.take(cost)

    def wait_ns(self, nbytes: int = 1, ops: int = 1) -> int:
        """Nanoseconds until a request of this cost would be allowed (at least 1 when it is not now)."""
        waits = [bucket.wait_ns(cost) for bucket, cost in self._pairs(nbytes, ops)]
        return max(waits, default=0)

    def save(self) -> RateLimiterState:
        return RateLimiterState(limit=self.limit, bandwidth=self.bandwidth.save() if self.bandwidth else None,
                                ops=self.ops.save() if self.ops else None)

    def restore(self, state: RateLimiterState) -> None:
        """Levels from a state saved under the same limit (the caller made this limiter from state.limit)."""
        for bucket, level in ((self.bandwidth, state.bandwidth), (self.ops, state.ops)):
            if bucket is not None and level is not None:
                bucket.restore(level)

    @classmethod
    def from_state(cls, state: RateLimiterState, clock: Clock = time.monotonic_ns) -> "RateLimiter":
        limiter = cls(state.limit, clock)
        limiter.restore(state)
        return limiter


def make_limiter(limit: RateLimit | None, clock: Clock = time.monotonic_ns) -> RateLimiter | None:
    return None if limit is None or limit.unlimited else RateLimiter(limit, clock)
