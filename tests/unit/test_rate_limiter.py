"""Token buckets with a fake clock: exact refill arithmetic, bursts, debts, waits, saved levels."""

import pytest
from hypothesis import given, settings, strategies as st

from helpers.state import through_json
from pyvmm.devices.rate_limiter import (
    NS_PER_MS, BucketLevel, RateLimit, RateLimiter, RateLimiterState, TokenBucket, TokenBucketConfig,
)
from pyvmm.errors import ConfigError
from pyvmm.persist import StateError


class FakeClock:
    def __init__(self, now: int = 10**12) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * NS_PER_MS)


def bucket(size, refill_ms, burst=0, clock=None):
    return TokenBucket(TokenBucketConfig(size, refill_ms, burst), clock or FakeClock())


def test_a_bucket_starts_full_and_refills_size_tokens_per_refill_time():
    clock = FakeClock()
    b = bucket(1000, 100, clock=clock)
    assert b.available() == 1000
    b.take(1000)
    assert b.available() == 0
    clock.advance_ms(10)          # a tenth of the refill time: a tenth of the tokens
    assert b.available() == 100
    clock.advance_ms(90)
    assert b.available() == 1000
    clock.advance_ms(1000)        # never more than size
    assert b.available() == 1000


def test_refill_keeps_the_remainder_however_often_the_clock_is_read():
    clock = FakeClock()
    b = bucket(3, 1000, clock=clock)   # 3 tokens a second: one every 333.33 ms
    b.take(3)
    for _ in range(1000):              # 1000 reads, 1 ms apart: each alone is worth 0.003 tokens
        clock.advance_ms(1)
        b.available()
    assert b.available() == 3
    b.take(3)
    clock.now += 333_333_333
    assert b.available() == 0          # 0.999999999 of a token
    clock.now += 1
    assert b.available() == 1


def test_one_time_burst_is_spent_first_and_never_refilled():
    clock = FakeClock()
    b = bucket(100, 1000, burst=50, clock=clock)
    assert b.available() == 150
    b.take(120)                        # 50 from the burst, 70 from the budget
    assert (b.burst, b.budget) == (0, 30)
    clock.advance_ms(10_000)
    assert b.available() == 100


def test_a_request_larger_than_the_bucket_goes_when_full_and_leaves_a_debt():
    clock = FakeClock()
    b = bucket(100, 1000, clock=clock)
    assert b.can_take(250)             # min(250, size) tokens are there
    b.take(250)
    assert b.budget == -150
    assert not b.can_take(1)
    assert b.wait_ns(1) == 1510 * NS_PER_MS   # 151 tokens at 10 ms each pay the debt back
    clock.advance_ms(1509)
    assert not b.can_take(1)
    clock.advance_ms(1)
    assert b.can_take(1)


def test_wait_is_exactly_the_time_until_the_request_fits():
    clock = FakeClock()
    b = bucket(1000, 1000, clock=clock)   # 1 token per ms
    b.take(1000)
    clock.now += 400_000                  # 0.4 ms: no token yet, the remainder is kept
    assert b.wait_ns(5) == 4_600_000
    clock.now += 4_599_999
    assert not b.can_take(5)
    clock.now += 1
    assert b.can_take(5)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 10**6), refill_ms=st.integers(1, 5000), burst=st.integers(0, 10**5),
       steps=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 3 * 10**6)), min_size=1, max_size=40))
def test_never_more_than_size_plus_burst_plus_the_refill_over_the_elapsed_time(size, refill_ms, burst, steps):
    """Tokens granted up to any time t <= size + burst + floor(t * size / refill_time) + the last request's overflow."""
    clock = FakeClock(0)
    limiter = RateLimiter(RateLimit(bandwidth=TokenBucketConfig(size, refill_ms, burst)), clock)
    granted = 0
    for elapsed, want in steps:
        clock.now += elapsed
        if limiter.consume(want, 0):
            granted += want
            overflow = max(0, want - size)
            assert granted <= size + burst + clock.now * size // (refill_ms * NS_PER_MS) + overflow
        else:
            wait = limiter.wait_ns(want, 0)
            assert wait >= 1
            clock.now += wait - 1
            assert not limiter.consume(want, 0)
            clock.now += 1
            assert limiter.consume(want, 0)
            granted += want


def test_both_buckets_must_allow_a_request_and_a_refusal_takes_nothing():
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(bandwidth=TokenBucketConfig(1000, 1000), ops=TokenBucketConfig(2, 1000)), clock)
    assert limiter.consume(100) and limiter.consume(100)
    assert not limiter.consume(100)               # the ops bucket is empty
    assert limiter.bandwidth.available() == 800   # nothing was taken from the other
    assert limiter.wait_ns(100) == 500 * NS_PER_MS
    clock.advance_ms(500)
    assert limiter.consume(100)


def test_charge_after_the_fact_and_ready():
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(bandwidth=TokenBucketConfig(1500, 1000)), clock)
    assert limiter.ready()
    limiter.charge(9000)                          # a frame bigger than the budget, known once read
    assert not limiter.ready()
    assert limiter.wait_ns() == -(-7501 * 1000 * NS_PER_MS // 1500)   # 1 - (1500 - 9000) tokens at 1.5 a ms
    clock.advance_ms(5000)
    assert not limiter.ready()
    clock.advance_ms(1)
    assert limiter.ready()


def test_levels_survive_a_save_and_restore_through_json():
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(bandwidth=TokenBucketConfig(3, 1000, 7), ops=TokenBucketConfig(10, 100)), clock)
    limiter.consume(8, 4)
    clock.now += 100                               # a sub-token remainder
    state = through_json(limiter.save())
    assert state.bandwidth == BucketLevel(budget=2, burst=0, credit=300)
    restored = RateLimiter.from_state(state, clock)
    assert restored.save() == state


def test_saved_levels_are_checked_against_their_limit():
    limit = RateLimit(bandwidth=TokenBucketConfig(100, 1000))
    with pytest.raises(StateError, match="budget"):
        RateLimiterState(limit=limit, bandwidth=BucketLevel(101, 0, 0), ops=None)
    with pytest.raises(StateError, match="ops"):
        RateLimiterState(limit=limit, bandwidth=BucketLevel(1, 0, 0), ops=BucketLevel(1, 0, 0))
    with pytest.raises(StateError, match="credit"):
        RateLimiterState(limit=limit, bandwidth=BucketLevel(1, 0, 1000 * NS_PER_MS), ops=None)
    with pytest.raises(StateError, match="size"):
        TokenBucketConfig(0, 1000)


def test_the_api_form():
    limit = RateLimit.from_api({"bandwidth": {"size": 10 << 20, "refill_time": 1000, "one_time_burst": 5},
                                "ops": {"size": 0, "refill_time": 100}}, "rate_limiter")
    assert limit == RateLimit(bandwidth=TokenBucketConfig(10 << 20, 1000, 5))   # size 0: no limit (Firecracker)
    assert limit.to_api() == {"bandwidth": {"size": 10 << 20, "one_time_burst": 5, "refill_time": 1000}}
    assert RateLimit.from_api({}, "rate_limiter") is None
    assert RateLimit.from_api(None, "rate_limiter") is None
    for bad, field in (([], "rate_limiter"), ({"bw": {}}, "rate_limiter.bw"),
                       ({"ops": {"size": 1}}, "rate_limiter.ops.refill_time"),
                       ({"ops": {"size": -1, "refill_time": 1}}, "rate_limiter.ops.size"),
                       ({"ops": {"size": True, "refill_time": 1}}, "rate_limiter.ops.size"),
                       ({"ops": {"size": 1, "refill_time": 1, "x": 2}}, "rate_limiter.ops.x")):
        with pytest.raises(ConfigError) as info:
            RateLimit.from_api(bad, "rate_limiter")
        assert info.value.field == field


def test_per_second():
    assert RateLimit.per_second(10 << 20, 100) == RateLimit(TokenBucketConfig(10 << 20, 1000),
                                                            TokenBucketConfig(100, 1000))
    assert RateLimit.per_second(None, 0) is None
