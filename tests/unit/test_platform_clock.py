import json

from helpers.state import changed, through_json
from pyvmm.persist import StateError

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.platform import VirtualClock, ns_from_tsc, tsc_from_ns


class HostTime:
    def __init__(self, now=1_000_000_000_000):
        self.now = now

    def __call__(self):
        return self.now


def test_guest_time_starts_at_zero_and_follows_the_host():
    host = HostTime()
    clock = VirtualClock(time_source=host)
    assert clock() == 0
    host.now += 1_500
    assert clock.now_ns() == 1_500


def test_paused_time_does_not_advance():
    host = HostTime()
    clock = VirtualClock(time_source=host)
    host.now += 100
    clock.pause()
    host.now += 10_000
    assert clock() == 100
    clock.pause()
    clock.resume()
    host.now += 5
    assert clock() == 105
    clock.resume()
    assert clock() == 105 and not clock.paused


def test_start_paused():
    host = HostTime()
    clock = VirtualClock(time_source=host, start_paused=True)
    host.now += 1000
    assert clock() == 0 and clock.paused


def test_tsc_conversions():
    clock = VirtualClock(tsc_hz=2_500_000_000, time_source=HostTime())
    assert clock.tsc(1_000) == 2_500
    assert clock.ns_from_tsc(2_501) == 1_001  # the first ns at which the TSC reaches 2501
    with pytest.raises(ValueError):
        VirtualClock(tsc_hz=0)


@given(st.integers(0, 1 << 64), st.integers(1_000_000, 10_000_000_000))
def test_ns_from_tsc_is_the_first_ns_reaching_the_tsc(tsc, hz):
    ns = ns_from_tsc(tsc, hz)
    assert tsc_from_ns(ns, hz) >= tsc
    assert ns == 0 or tsc_from_ns(ns - 1, hz) < tsc


def test_save_restore_continues_from_the_saved_time():
    host = HostTime()
    clock = VirtualClock(tsc_hz=3_000_000_000, time_source=host)
    host.now += 7_000
    state = through_json(clock.save())
    other_host = HostTime(now=5)
    copy = VirtualClock(time_source=other_host)
    copy.restore(state)
    assert copy() == 7_000 and copy.tsc_hz == 3_000_000_000
    other_host.now += 10
    assert copy() == 7_010
    with pytest.raises(ValueError):
        changed(copy.save(), now_ns=-1)


def test_real_time_source_is_monotonic():
    clock = VirtualClock()
    a = clock()
    b = clock()
    assert 0 <= a <= b
