import json

from helpers.state import changed, through_json
from pyvmm.persist import StateError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.platform import PIT_HZ, Pit8254

NS = 1_000_000_000
HZ = 250
LATCH = (PIT_HZ + HZ // 2) // HZ  # Linux's LATCH for HZ=250: 4773


class FakeClock:
    def __init__(self, now=0):
        self.now = now

    def __call__(self):
        return self.now


class CountingIrq:
    def __init__(self):
        self.edges = 0
        self.levels = []

    def trigger(self):
        self.edges += 1

    def set_level(self, high):
        self.levels.append(high)


def make_pit(now=0):
    clock, irq = FakeClock(now), CountingIrq()
    return Pit8254(irq, clock), clock, irq


def outb(pit, port, value):
    if port == 0x61:
        pit.port61.write(0, bytes((value,)))
    else:
        pit.write(port - 0x40, bytes((value,)))


def inb(pit, port):
    if port == 0x61:
        return pit.port61.read(0, 1)[0]
    return pit.read(port - 0x40, 1)[0]


def ns_for_ticks(ticks):
    return ticks * NS // PIT_HZ


def program_periodic(pit, latch=LATCH):
    """Linux's pit_set_periodic: counter 0, lo/hi, mode 2, binary."""
    outb(pit, 0x43, 0x34)
    outb(pit, 0x40, latch & 0xFF)
    outb(pit, 0x40, latch >> 8)


# --- counter 0 and IRQ 0 --------------------------------------------------------------------


def test_mode2_at_hz250_gives_250_edges_per_second():
    pit, clock, irq = make_pit()
    program_periodic(pit)
    edge_times = []
    for now in range(0, 2 * NS + 1_000_000, 100_000):  # poll every 100 us for 2.001 s
        before = irq.edges
        pit.poll(now)
        if irq.edges != before:
            edge_times.append(now)
    assert len(edge_times) == 500
    period = LATCH * NS / PIT_HZ
    assert edge_times[0] == pytest.approx(period, abs=100_000)
    assert edge_times[-1] == pytest.approx(500 * period, abs=100_000)


def test_next_deadline_is_exactly_the_next_period_boundary():
    pit, clock, irq = make_pit(now=5_000)
    assert pit.next_deadline_ns(5_000) is None
    program_periodic(pit)
    first = pit.next_deadline_ns(5_000)
    assert first == 5_000 + -(-LATCH * NS // PIT_HZ)
    pit.poll(first - 1)
    assert irq.edges == 0
    pit.poll(first)
    assert irq.edges == 1
    assert pit.next_deadline_ns(first) == 5_000 + -(-2 * LATCH * NS // PIT_HZ)


def test_missed_periods_are_discarded_one_edge_per_poll():
    pit, clock, irq = make_pit()
    program_periodic(pit)
    pit.poll(100_000_000)  # 25 periods late
    assert irq.edges == 1
    pit.poll(100_000_000)
    assert irq.edges == 1
    deadline = pit.next_deadline_ns(100_000_000)
    assert 100_000_000 < deadline <= 100_000_000 + LATCH * NS // PIT_HZ + 1


def test_counter_reads_count_down_and_reload():
    pit, clock, irq = make_pit()
    program_periodic(pit, latch=1000)
    clock.now = ns_for_ticks(300) + 1
    value = inb(pit, 0x40) | inb(pit, 0x40) << 8
    assert value == 700
    clock.now = ns_for_ticks(1250) + 1
    value = inb(pit, 0x40) | inb(pit, 0x40) << 8
    assert value == 750


def test_latch_command_freezes_the_value_until_read():
    pit, clock, irq = make_pit()
    program_periodic(pit, latch=1000)
    clock.now = ns_for_ticks(100) + 1
    outb(pit, 0x43, 0x00)  # latch counter 0
    clock.now = ns_for_ticks(400) + 1
    outb(pit, 0x43, 0x00)  # ignored: the first latch is not read yet
    assert inb(pit, 0x40) | inb(pit, 0x40) << 8 == 900
    assert inb(pit, 0x40) | inb(pit, 0x40) << 8 == 600  # live again


def test_read_back_latches_status_then_count():
    pit, clock, irq = make_pit()
    program_periodic(pit, latch=1000)
    clock.now = ns_for_ticks(10) + 1
    outb(pit, 0x43, 0xC2)  # read-back: count and status of counter 0
    status = inb(pit, 0x40)
    assert status == 0x80 | 0x34  # OUT high, not null count, lo/hi, mode 2, binary
    assert inb(pit, 0x40) | inb(pit, 0x40) << 8 == 990


def test_null_count_until_count_written():
    pit, clock, irq = make_pit()
    outb(pit, 0x43, 0x34)
    outb(pit, 0x43, 0xE2)  # status only
    assert inb(pit, 0x40) & 0x40


def test_mode0_shutdown_fires_once_after_65536_ticks():
    pit, clock, irq = make_pit()
    outb(pit, 0x43, 0x30)  # Linux's pit_shutdown
    outb(pit, 0x40, 0)
    outb(pit, 0x40, 0)
    deadline = pit.next_deadline_ns(0)
    assert deadline == pytest.approx(65536 * NS / PIT_HZ, abs=1)
    pit.poll(deadline)
    pit.poll(deadline * 3)
    assert irq.edges == 1
    assert pit.next_deadline_ns(deadline * 3) is None


def test_mode4_strobe_is_one_shot():
    pit, clock, irq = make_pit()
    outb(pit, 0x43, 0x38)  # Linux's oneshot clockevent: mode 4
    outb(pit, 0x40, 100)
    outb(pit, 0x40, 0)
    for now in range(0, ns_for_ticks(1000), 10_000):
        pit.poll(now)
    assert irq.edges == 1


def test_mode3_square_wave_output_and_edges():
    pit, clock, irq = make_pit()
    outb(pit, 0x43, 0x36)
    outb(pit, 0x40, 100)
    outb(pit, 0x40, 0)
    assert pit.out(0, ns_for_ticks(20) + 1)
    assert not pit.out(0, ns_for_ticks(70) + 1)
    assert pit.out(0, ns_for_ticks(120) + 1)
    for now in range(0, ns_for_ticks(1050), 5_000):
        pit.poll(now)
    assert irq.edges == 10


def test_lobyte_only_access_and_bcd():
    pit, clock, irq = make_pit()
    outb(pit, 0x43, 0x14)  # counter 0, LSB only, mode 2
    outb(pit, 0x40, 50)
    assert pit.next_deadline_ns(0) == -(-50 * NS // PIT_HZ)
    outb(pit, 0x43, 0x35)  # lo/hi, mode 2, BCD
    outb(pit, 0x40, 0x00)
    outb(pit, 0x40, 0x10)  # 1000 decimal
    assert pit.next_deadline_ns(0) == -(-1000 * NS // PIT_HZ)
    clock.now = ns_for_ticks(1) + 1
    assert inb(pit, 0x40) | inb(pit, 0x40) << 8 == 0x0999


# --- counter 2 and port 0x61: Linux's TSC calibration ---------------------------------------


def test_pit_calibrate_tsc_mode0_countdown_polled_through_port_61():
    """arch/x86/kernel/tsc.c pit_calibrate_tsc: gate on, mode 0, poll OUT2 (bit 5 of 0x61)."""
    pit, clock, irq = make_pit(now=1_000_000)
    latch = PIT_HZ // (1000 / 10)  # CAL_LATCH for 10 ms
    latch = int(latch)
    outb(pit, 0x61, (inb(pit, 0x61) & ~0x02) | 0x01)
    outb(pit, 0x43, 0xB0)
    outb(pit, 0x42, latch & 0xFF)
    outb(pit, 0x42, latch >> 8)
    start = clock.now
    loops = 0
    while not inb(pit, 0x61) & 0x20:
        clock.now += 1_000  # each port read takes a microsecond of guest time
        loops += 1
        assert loops < 100_000
    elapsed = clock.now - start
    assert elapsed == pytest.approx(10_000_000, abs=2_000)
    assert irq.edges == 0  # counter 2 is not wired to an IRQ
    assert inb(pit, 0x61) & 0x01


def test_quick_pit_calibrate_sees_msb_decrease_every_256_ticks():
    """tsc.c quick_pit_calibrate: mode 0 from 0xffff, read LSB then MSB without latching."""
    pit, clock, irq = make_pit()
    outb(pit, 0x61, (inb(pit, 0x61) & ~0x02) | 0x01)
    outb(pit, 0x43, 0xB0)
    outb(pit, 0x42, 0xFF)
    outb(pit, 0x42, 0xFF)
    msbs = []
    for i in range(1, 40):
        clock.now = ns_for_ticks(256 * i) + 500
        inb(pit, 0x42)
        msbs.append(inb(pit, 0x42))
    assert msbs == [0xFF - i for i in range(1, 40)]


def test_gate_low_stops_counter2_in_mode0():
    pit, clock, irq = make_pit()
    outb(pit, 0x61, 0x01)
    outb(pit, 0x43, 0xB0)
    outb(pit, 0x42, 0xE8)
    outb(pit, 0x42, 0x03)  # 1000
    clock.now = ns_for_ticks(400) + 1
    outb(pit, 0x61, 0x00)  # gate off: counting suspended
    clock.now = ns_for_ticks(5000)
    assert not inb(pit, 0x61) & 0x20
    assert inb(pit, 0x42) | inb(pit, 0x42) << 8 == 600
    outb(pit, 0x61, 0x01)
    clock.now += ns_for_ticks(601)
    assert inb(pit, 0x61) & 0x20


def test_gate_rising_edge_restarts_mode2():
    pit, clock, irq = make_pit()
    outb(pit, 0x43, 0xB4)  # counter 2, lo/hi, mode 2
    outb(pit, 0x42, 0xE8)
    outb(pit, 0x42, 0x03)
    clock.now = ns_for_ticks(100)
    outb(pit, 0x61, 0x01)  # gate rises: count starts from 1000 here
    clock.now = ns_for_ticks(400) + 1
    assert inb(pit, 0x42) | inb(pit, 0x42) << 8 == 700


def test_port61_keeps_control_bits_and_toggles_refresh():
    pit, clock, irq = make_pit()
    outb(pit, 0x61, 0xFF)
    assert inb(pit, 0x61) & 0x0F == 0x0F
    assert pit.speaker_enabled
    seen = set()
    for now in range(0, 100_000, 3_000):
        clock.now = now
        seen.add(inb(pit, 0x61) & 0x10)
    assert seen == {0, 0x10}


# --- snapshots and robustness ---------------------------------------------------------------


def test_save_restore_continues_the_same_schedule():
    pit, clock, irq = make_pit()
    program_periodic(pit)
    clock.now = 10_000_000
    pit.poll(clock.now)
    outb(pit, 0x43, 0x80 | 0x00)  # latch counter 2 (value stays latched in the snapshot)
    state = through_json(pit.save())
    copy_irq = CountingIrq()
    copy = Pit8254(copy_irq, clock)
    copy.restore(state)
    assert copy.save() == pit.save()
    assert copy.next_deadline_ns(clock.now) == pit.next_deadline_ns(clock.now)


def test_restore_rejects_garbage():
    pit, clock, irq = make_pit()
    with pytest.raises(StateError, match="i8254 state expected"):
        pit.restore({"counters": [{}, {}, {}]})
    with pytest.raises(StateError, match="mode: 6 is outside 0..5"):
        changed(pit.save().counters[0], mode=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("out"), st.sampled_from([0x40, 0x41, 0x42, 0x43, 0x61]), st.integers(0, 255)),
    st.tuples(st.just("in"), st.sampled_from([0x40, 0x41, 0x42, 0x43, 0x61]), st.just(0)),
    st.tuples(st.just("time"), st.just(0), st.integers(0, 50_000_000)),
), max_size=60))
def test_random_port_traffic_never_raises(ops):
    pit, clock, irq = make_pit()
    for op, port, value in ops:
        if op == "out":
            outb(pit, port, value)
        elif op == "in":
            assert 0 <= inb(pit, port) <= 0xFF
        else:
            clock.now += value
            before = irq.edges
            pit.poll(clock.now)
            assert irq.edges - before <= 1
            deadline = pit.next_deadline_ns(clock.now)
            assert deadline is None or deadline > clock.now
    copy = Pit8254(CountingIrq(), clock)
    copy.restore(through_json(pit.save()))
    assert copy.save() == pit.save()
