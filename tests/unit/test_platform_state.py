"""SoftwarePlatform as one state: clock, 8259 pair, PIT, IOAPIC and the LAPICs, saved and restored together."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.state import changed, through_json
from pyvmm.persist import StateError
from pyvmm.platform.lapic import REG_LVT_TIMER, REG_SVR, REG_TIMER_DIVIDE, REG_TIMER_INITIAL
from pyvmm.platform.machine import SoftwarePlatform

TSC_HZ = 2_000_000_000


class FakeTime:
    def __init__(self):
        self.ns = 1_000_000

    def __call__(self):
        return self.ns


def platform(cpus=2, tsc_hz=TSC_HZ, time=None):
    machine = SoftwarePlatform(lambda: None, tsc_hz, lapic_timer_hz=1_000_000_000)
    if time is not None:   # a test clock for the whole machine
        machine.clock._time_source = time
        machine.clock._offset = time()
    for index in range(cpus):
        machine.add_cpu(index)
    return machine


def lapic_write(lapic, offset, value):
    lapic.write(offset, struct.pack("<I", value))


def busy(machine):
    """A PIT at 100 Hz, a LAPIC timer counting, an IOAPIC pin high, a PIC mask changed."""
    machine.pit.write(3, b"\x34")
    machine.pit.write(0, b"\x9c")
    machine.pit.write(0, b"\x2e")
    lapic = machine.lapics[0]
    lapic_write(lapic, REG_SVR, 0x1FF)
    lapic_write(lapic, REG_TIMER_DIVIDE, 0xB)
    lapic_write(lapic, REG_LVT_TIMER, 0x20030)
    lapic_write(lapic, REG_TIMER_INITIAL, 5_000_000)
    machine.ioapic.set_irq(20, True)
    machine.pic.master_ports.write(1, b"\xfa")


def test_a_paused_machine_round_trips_and_keeps_its_timers_schedule():
    time = FakeTime()
    machine = platform(time=time)
    busy(machine)
    time.ns += 3_000_000
    machine.clock.pause()
    state = through_json(machine.save())

    later = FakeTime()
    later.ns = 50_000_000_000          # another moment of the host: guest time continues from the save
    fresh = platform(time=later)
    fresh.restore(state)
    assert fresh.save() == state
    assert fresh.clock.now_ns() == machine.clock.now_ns()
    now = fresh.clock.now_ns()
    assert fresh.pit.next_deadline_ns(now) == machine.pit.next_deadline_ns(now)
    assert fresh.lapics[0].next_deadline_ns() == machine.lapics[0].next_deadline_ns()
    assert fresh.ioapic.asserted(20) and fresh.pic.imr & 0xFF == 0xFA
    fresh.clock.resume()
    later.ns += 10_000_000             # 10 ms of guest time: the PIT (100 Hz) is due
    fresh.poll()
    assert fresh.pit.irq_edges >= 1


def test_restore_checks_everything_before_changing_anything():
    machine = platform()
    busy(machine)
    state = machine.save()
    fresh = platform()
    before = fresh.save()
    with pytest.raises(StateError, match="lapics: 2 saved, this machine has 1 vCPUs"):
        platform(cpus=1).restore(state)
    with pytest.raises(StateError, match="clock: the TSC ran at 2000000000 Hz, this host's runs at 3000000000"):
        platform(tsc_hz=3_000_000_000).restore(state)
    bad_ioapic = changed(state.ioapic, redirection=state.ioapic.redirection[:4])
    with pytest.raises(StateError, match="redirection: 4 entries"):
        fresh.restore(changed(state, ioapic=bad_ioapic))
    assert changed(fresh.save(), clock=before.clock) == before


def test_a_rate_within_calibration_noise_is_taken_as_this_hosts():
    machine = platform()
    state = machine.save()
    fresh = platform(tsc_hz=TSC_HZ + 1000)
    fresh.restore(state)
    assert fresh.clock.tsc_hz == TSC_HZ + 1000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["pit", "pic", "lapic", "ioapic"]), st.integers(0, 3),
                          st.integers(0, 0xFFFFFFFF)), max_size=30))
def test_any_reachable_platform_state_round_trips(ops):
    time = FakeTime()
    machine = platform(time=time)
    for device, offset, value in ops:
        if device == "pit":
            machine.pit.write(offset, bytes([value & 0xFF]))
        elif device == "pic":
            (machine.pic.master_ports if value & 0x100 else machine.pic.slave_ports).write(offset & 1,
                                                                                            bytes([value & 0xFF]))
        elif device == "lapic":
            register = (REG_SVR, REG_LVT_TIMER, REG_TIMER_DIVIDE, REG_TIMER_INITIAL)[offset]
            lapic_write(machine.lapics[value & 1], register, value)
        else:
            machine.ioapic.set_irq(value % 24, bool(offset & 1))
        time.ns += value % 1_000_000
        machine.poll()
    machine.clock.pause()
    state = machine.save()
    fresh = platform(time=FakeTime())
    fresh.restore(through_json(state))
    assert fresh.save() == state
