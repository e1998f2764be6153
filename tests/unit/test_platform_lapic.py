import json

from helpers.state import changed, through_json
from pyvmm.persist import StateError
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.platform import ApicBus, IoApic, LocalApic, Pic8259Pair
from pyvmm.platform.lapic import (
    REG_DFR, REG_EOI, REG_ESR, REG_ICR_HIGH, REG_ICR_LOW, REG_ID, REG_IRR, REG_ISR, REG_LDR,
    REG_LVT_ERROR, REG_LVT_LINT0, REG_LVT_TIMER, REG_PPR, REG_SVR, REG_TIMER_CURRENT,
    REG_TIMER_DIVIDE, REG_TIMER_INITIAL, REG_TPR, REG_VERSION,
)

LOCAL_TIMER_VECTOR = 0xEC  # what Linux uses
SPURIOUS_VECTOR = 0xFF


class FakeClock:
    def __init__(self, now=0):
        self.now = now

    def __call__(self):
        return self.now


def rd(lapic, reg):
    return int.from_bytes(lapic.read(reg, 4), "little")


def wr(lapic, reg, value):
    lapic.write(reg, value.to_bytes(4, "little"))


def enable(lapic):
    wr(lapic, REG_SVR, 0x100 | SPURIOUS_VECTOR)


def make(count=1, **kwargs):
    clock, bus = FakeClock(), ApicBus()
    lapics = [LocalApic(i, clock, bus, **kwargs) for i in range(count)]
    for lapic in lapics:
        enable(lapic)
    return clock, bus, lapics


def send(bus, vector, destination=0, mode=0, logical=False, level=False):
    return bus.deliver(vector, mode, destination, logical, level_triggered=level)


def ack_all(lapic):
    vectors = []
    while (vector := lapic.pending_vector()) is not None:
        assert lapic.acknowledge() == vector
        vectors.append(vector)
    return vectors


# --- registers ------------------------------------------------------------------------------


def test_reset_values_and_version():
    clock, bus = FakeClock(), ApicBus()
    lapic = LocalApic(3, clock, bus)
    assert rd(lapic, REG_ID) == 3 << 24
    assert rd(lapic, REG_VERSION) == 0x00050014
    assert rd(lapic, REG_SVR) == 0xFF
    assert rd(lapic, REG_DFR) == 0xFFFFFFFF
    assert rd(lapic, REG_LVT_TIMER) == 0x10000
    assert lapic.apic_base == 0xFEE00800  # enabled, not BSP
    assert LocalApic(0, clock, bus).apic_base == 0xFEE00900


def test_duplicate_apic_id_is_refused():
    clock, bus = FakeClock(), ApicBus()
    LocalApic(0, clock, bus)
    with pytest.raises(ValueError):
        LocalApic(0, clock, bus)


def test_lvt_masks_cannot_be_cleared_while_software_disabled():
    clock, bus = FakeClock(), ApicBus()
    lapic = LocalApic(0, clock, bus)
    wr(lapic, REG_LVT_TIMER, 0x20)
    assert rd(lapic, REG_LVT_TIMER) == 0x10020
    enable(lapic)
    wr(lapic, REG_LVT_TIMER, 0x20)
    assert rd(lapic, REG_LVT_TIMER) == 0x20
    wr(lapic, REG_SVR, 0xFF)  # software disable masks every LVT
    assert rd(lapic, REG_LVT_TIMER) & 0x10000


def test_esr_latches_on_write_and_reports_illegal_vectors():
    clock, bus, (lapic,) = make()
    send(bus, 0x05)
    assert rd(lapic, REG_ESR) == 0
    wr(lapic, REG_ESR, 0)
    assert rd(lapic, REG_ESR) == 0x40  # receive illegal vector
    wr(lapic, REG_ESR, 0)
    assert rd(lapic, REG_ESR) == 0


def test_error_lvt_delivers_on_error():
    clock, bus, (lapic,) = make()
    wr(lapic, REG_LVT_ERROR, 0xFE)
    wr(lapic, REG_ICR_LOW, 0x00040003)  # fixed IPI to self with vector 3: send illegal vector
    assert lapic.pending_vector() == 0xFE


# --- acceptance, priority, EOI --------------------------------------------------------------


def test_fixed_interrupt_irr_to_isr_and_eoi():
    clock, bus, (lapic,) = make()
    send(bus, 0x41)
    assert rd(lapic, REG_IRR + 0x20) == 1 << 1  # vector 0x41: IRR word 2, bit 1
    assert lapic.acknowledge() == 0x41
    assert rd(lapic, REG_ISR + 0x20) == 1 << 1 and rd(lapic, REG_IRR + 0x20) == 0
    assert rd(lapic, REG_PPR) == 0x40
    wr(lapic, REG_EOI, 0)
    assert lapic.isr == 0 and rd(lapic, REG_PPR) == 0


def test_tpr_blocks_vectors_at_or_below_its_class():
    clock, bus, (lapic,) = make()
    wr(lapic, REG_TPR, 0x50)
    send(bus, 0x45)
    send(bus, 0x5F)
    assert lapic.pending_vector() is None
    send(bus, 0x61)
    assert ack_all(lapic) == [0x61]
    wr(lapic, REG_EOI, 0)
    wr(lapic, REG_TPR, 0x40)
    assert ack_all(lapic) == [0x5F]
    wr(lapic, REG_TPR, 0)
    assert lapic.pending_vector() is None  # 0x45 is below the class of the in-service 0x5F
    wr(lapic, REG_EOI, 0)
    assert ack_all(lapic) == [0x45]


def test_nested_interrupts_eoi_the_highest_first():
    clock, bus, (lapic,) = make()
    send(bus, 0x30)
    assert lapic.acknowledge() == 0x30
    send(bus, 0x38)
    assert lapic.pending_vector() is None  # same priority class as the one in service
    send(bus, 0x80)
    assert lapic.acknowledge() == 0x80  # higher class nests
    assert rd(lapic, REG_PPR) == 0x80
    wr(lapic, REG_EOI, 0)
    assert lapic.isr == 1 << 0x30
    assert lapic.pending_vector() is None
    wr(lapic, REG_EOI, 0)
    assert ack_all(lapic) == [0x38]


def test_software_disabled_lapic_holds_fixed_interrupts():
    clock, bus = FakeClock(), ApicBus()
    lapic = LocalApic(0, clock, bus)
    send(bus, 0x50)
    assert lapic.pending_vector() is None
    enable(lapic)
    assert lapic.pending_vector() == 0x50


def test_acknowledge_with_nothing_pending_returns_spurious_vector():
    clock, bus, (lapic,) = make()
    assert lapic.acknowledge() == SPURIOUS_VECTOR
    assert lapic.isr == 0


def test_acknowledge_if_pending_takes_what_acknowledge_would_and_says_whether_more_waits():
    clock, bus, (lapic,) = make()
    assert lapic.acknowledge_if_pending() == (None, False)
    assert lapic.isr == 0  # nothing pending: no spurious INTA either
    send(bus, 0x41)
    send(bus, 0x81)
    assert lapic.acknowledge_if_pending() == (0x81, False)  # 0x41 is held below the class in service
    wr(lapic, REG_EOI, 0)
    assert lapic.acknowledge_if_pending() == (0x41, False)
    wr(lapic, REG_EOI, 0)
    send(bus, 0x41)
    send(bus, 0x91)
    wr(lapic, REG_TPR, 0x30)
    assert lapic.acknowledge_if_pending() == (0x91, False)
    wr(lapic, REG_EOI, 0)
    send(bus, 0xA1)
    assert lapic.acknowledge_if_pending() == (0xA1, False)
    assert lapic.isr == 1 << 0xA1 and lapic.pending_vector() is None


def test_acknowledge_if_pending_takes_the_pic_vector_through_the_virtual_wire():
    clock, bus = FakeClock(), ApicBus()
    pic = _pic_with_irq(0)
    lapic = LocalApic(0, clock, bus, pic=pic)
    enable(lapic)
    send(bus, 0x41)
    assert lapic.acknowledge_if_pending() == (0x41, False)  # LINT0 masked: the PIC is not heard
    wr(lapic, REG_EOI, 0)
    wr(lapic, REG_LVT_LINT0, 0x700)
    send(bus, 0x41)
    # the PIC first, as acknowledge(); then 0x41 is deliverable (the PIC's vector is not in the LAPIC's ISR)
    assert lapic.acknowledge_if_pending() == (0x30, True)
    assert pic.isr == 0x01 and lapic.isr == 0


def test_dword_access_is_read_and_write_of_four_bytes():
    clock, bus, (lapic,) = make()
    lapic.write_dword(REG_TPR, 0x1_0000_0020)  # (bits past the register's 32 are not the register's)
    assert rd(lapic, REG_TPR) == 0x20 == lapic.read_dword(REG_TPR)
    send(bus, 0x41)
    assert lapic.acknowledge() == 0x41
    assert lapic.read_dword(REG_ISR + 0x20) == rd(lapic, REG_ISR + 0x20) == 1 << 1
    lapic.write_dword(REG_EOI, 0)
    assert lapic.isr == 0
    assert lapic.read_dword(REG_TPR + 4) == 0  # not a register's first dword
    lapic.write_apic_base(0xFEE00100)  # hardware disabled: reads 0, writes ignored
    lapic.write_dword(REG_TPR, 0x40)
    assert lapic.read_dword(REG_TPR) == 0 == rd(lapic, REG_TPR)


# --- timer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code,divisor", [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16),
                                          (0x8, 32), (0x9, 64), (0xA, 128), (0xB, 1)])
def test_timer_one_shot_fires_at_the_right_ns_for_each_divider(code, divisor):
    clock, bus, (lapic,) = make()
    clock.now = 1_000
    wr(lapic, REG_TIMER_DIVIDE, code)
    wr(lapic, REG_LVT_TIMER, LOCAL_TIMER_VECTOR)
    wr(lapic, REG_TIMER_INITIAL, 1000)
    due = 1_000 + 1000 * divisor  # 1 GHz bus clock: one count per divisor ns
    assert lapic.next_deadline_ns() == due
    clock.now = 1_000 + 500 * divisor
    assert rd(lapic, REG_TIMER_CURRENT) == 500
    lapic.poll(due - 1)
    assert lapic.pending_vector() is None
    lapic.poll(due)
    assert lapic.pending_vector() == LOCAL_TIMER_VECTOR
    lapic.acknowledge()
    wr(lapic, REG_EOI, 0)
    lapic.poll(due * 10)
    assert lapic.pending_vector() is None  # one-shot
    clock.now = due * 10
    assert rd(lapic, REG_TIMER_CURRENT) == 0
    assert lapic.next_deadline_ns() is None


def test_timer_periodic_reloads_and_coalesces_missed_periods():
    clock, bus, (lapic,) = make()
    wr(lapic, REG_TIMER_DIVIDE, 0xB)  # divide by 1
    wr(lapic, REG_LVT_TIMER, 1 << 17 | LOCAL_TIMER_VECTOR)
    wr(lapic, REG_TIMER_INITIAL, 4_000_000)  # 4 ms: HZ=250
    fired = 0
    for now in range(0, 100_000_001, 250_000):
        lapic.poll(now)
        if lapic.pending_vector() is not None:
            lapic.acknowledge()
            wr(lapic, REG_EOI, 0)
            fired += 1
    assert fired == 25
    clock.now = 101_000_000
    assert rd(lapic, REG_TIMER_CURRENT) == 3_000_000
    lapic.poll(200_000_000)  # 25 periods late: one interrupt
    assert ack_all(lapic) == [LOCAL_TIMER_VECTOR]
    assert lapic.next_deadline_ns() == 204_000_000


def test_masked_timer_expiry_is_lost():
    clock, bus, (lapic,) = make()
    wr(lapic, REG_TIMER_DIVIDE, 0xB)
    wr(lapic, REG_LVT_TIMER, 0x10000 | LOCAL_TIMER_VECTOR)
    wr(lapic, REG_TIMER_INITIAL, 100)
    assert lapic.next_deadline_ns() is None
    clock.now = 500
    wr(lapic, REG_LVT_TIMER, LOCAL_TIMER_VECTOR)  # unmask after the expiry
    lapic.poll(600)
    assert lapic.pending_vector() is None


def test_divide_change_keeps_the_current_count():
    clock, bus, (lapic,) = make()
    wr(lapic, REG_TIMER_DIVIDE, 0xB)
    wr(lapic, REG_LVT_TIMER, LOCAL_TIMER_VECTOR)
    wr(lapic, REG_TIMER_INITIAL, 1000)
    clock.now = 400
    wr(lapic, REG_TIMER_DIVIDE, 0x0)  # divide by 2 from here: 600 counts left take 1200 ns
    assert rd(lapic, REG_TIMER_CURRENT) == 600
    assert lapic.next_deadline_ns() == 1600


def test_tsc_deadline_timer():
    clock, bus = FakeClock(), ApicBus()
    lapic = LocalApic(0, clock, bus, tsc_hz=2_000_000_000)
    enable(lapic)
    lapic.write_tsc_deadline(1000)
    assert lapic.read_tsc_deadline() == 0  # ignored outside TSC-deadline mode
    wr(lapic, REG_LVT_TIMER, 2 << 17 | LOCAL_TIMER_VECTOR)
    wr(lapic, REG_TIMER_INITIAL, 5)  # ignored in TSC-deadline mode
    assert rd(lapic, REG_TIMER_CURRENT) == 0
    lapic.write_tsc_deadline(5001)  # 2 GHz: 5001 ticks is 2500.5 ns
    assert lapic.read_tsc_deadline() == 5001
    assert lapic.next_deadline_ns() == 2501
    lapic.poll(2500)
    assert lapic.pending_vector() is None
    assert lapic.pending_vector(2501) == LOCAL_TIMER_VECTOR
    assert lapic.read_tsc_deadline() == 0  # disarmed after firing
    lapic.write_tsc_deadline(9000)
    wr(lapic, REG_LVT_TIMER, LOCAL_TIMER_VECTOR)  # leaving TSC-deadline mode disarms
    wr(lapic, REG_LVT_TIMER, 2 << 17 | LOCAL_TIMER_VECTOR)
    assert lapic.read_tsc_deadline() == 0


# --- IPIs -----------------------------------------------------------------------------------


def test_init_sipi_to_another_lapic_as_linux_boots_an_ap():
    clock, bus, (bsp, ap) = make(2)
    wr(ap, REG_TPR, 0x20)
    wr(bsp, REG_ICR_HIGH, 1 << 24)
    wr(bsp, REG_ICR_LOW, 0x0000C500)  # INIT, level, assert
    wr(bsp, REG_ICR_HIGH, 1 << 24)
    wr(bsp, REG_ICR_LOW, 0x00008500)  # INIT de-assert: no effect
    for _ in range(2):
        wr(bsp, REG_ICR_HIGH, 1 << 24)
        wr(bsp, REG_ICR_LOW, 0x00000600 | 0x9A)  # STARTUP, vector 0x9A -> 0x9A000
    assert ap.take_startup_events() == [("init",), ("sipi", 0x9A), ("sipi", 0x9A)]
    assert ap.take_startup_events() == []
    assert bsp.take_startup_events() == []
    assert rd(ap, REG_TPR) == 0 and rd(ap, REG_SVR) == 0xFF  # INIT reset the AP's LAPIC
    assert rd(ap, REG_ID) == 1 << 24


def test_fixed_ipi_physical_logical_and_shorthands():
    clock, bus, lapics = make(3)
    for i, lapic in enumerate(lapics):
        wr(lapic, REG_LDR, (1 << i) << 24)
    src = lapics[0]
    wr(src, REG_ICR_HIGH, 2 << 24)
    wr(src, REG_ICR_LOW, 0x40)  # physical, to APIC 2
    assert [l.pending_vector() for l in lapics] == [None, None, 0x40]
    wr(src, REG_ICR_HIGH, 0x03 << 24)
    wr(src, REG_ICR_LOW, 0x800 | 0x50)  # logical flat: CPUs 0 and 1
    assert [ack_all(l) for l in lapics] == [[0x50], [0x50], [0x40]]
    wr(src, REG_ICR_LOW, 3 << 18 | 0x60)  # all excluding self
    assert [ack_all(l) for l in lapics] == [[], [0x60], [0x60]]
    wr(src, REG_ICR_LOW, 1 << 18 | 0x70)  # self
    assert [ack_all(l) for l in lapics] == [[0x70], [], []]
    wr(src, REG_ICR_LOW, 2 << 18 | 0xA0)  # all including self
    assert [ack_all(l) for l in lapics] == [[0xA0]] * 3
    wr(src, REG_ICR_HIGH, 0xFF << 24)
    wr(src, REG_ICR_LOW, 0xB0)  # physical broadcast
    assert [ack_all(l) for l in lapics] == [[0xB0]] * 3


def test_logical_cluster_model():
    clock, bus, lapics = make(2)
    for i, lapic in enumerate(lapics):
        wr(lapic, REG_DFR, 0x0FFFFFFF)
        wr(lapic, REG_LDR, (0x10 | 1 << i) << 24)  # cluster 1, members 1 and 2
    send(bus, 0x40, destination=0x12, logical=True)
    send(bus, 0x50, destination=0x22, logical=True)  # other cluster: nobody
    assert [ack_all(l) for l in lapics] == [[], [0x40]]


def test_lowest_priority_goes_to_one_lapic():
    clock, bus, lapics = make(2)
    for i, lapic in enumerate(lapics):
        wr(lapic, REG_LDR, (1 << i) << 24)
    assert send(bus, 0x40, destination=0x03, logical=True, mode=1) == 1
    assert [ack_all(l) for l in lapics] == [[0x40], []]


def test_nmi_ipi():
    clock, bus, (bsp, ap) = make(2)
    wr(bsp, REG_ICR_HIGH, 1 << 24)
    wr(bsp, REG_ICR_LOW, 0x400)
    assert ap.nmi_pending and not bsp.nmi_pending
    assert ap.take_nmi() is True
    assert ap.take_nmi() is False


def test_hardware_disabled_lapic_hears_nothing_and_reset_on_disable():
    clock, bus, (lapic,) = make()
    wr(lapic, REG_TPR, 0x30)
    lapic.write_apic_base(0xFEE00000)
    assert rd(lapic, REG_TPR) == 0
    assert send(bus, 0x40) == 0
    lapic.write_apic_base(0xFEE00800)
    assert rd(lapic, REG_SVR) == 0xFF and lapic.apic_base == 0xFEE00900


# --- level-triggered EOI to the IOAPIC ------------------------------------------------------


def test_eoi_of_level_vector_notifies_ioapic_and_edge_does_not():
    clock, bus, (lapic,) = make()
    seen = []

    class RecordingIoApic:
        def end_of_interrupt(self, vector):
            seen.append(vector)

    bus.attach_ioapic(RecordingIoApic())
    send(bus, 0x41, level=True)
    send(bus, 0x51)
    assert lapic.tmr == 1 << 0x41
    assert ack_all(lapic) == [0x51]
    wr(lapic, REG_EOI, 0)
    assert ack_all(lapic) == [0x41]
    wr(lapic, REG_EOI, 0)
    assert seen == [0x41]


# --- the 8259 through LINT0 -----------------------------------------------------------------


def _pic_with_irq(irq):
    pic = Pic8259Pair()
    for port, value in ((0, 0x11), (1, 0x30), (1, 0x04), (1, 0x01), (1, 0x00)):
        pic.master_ports.write(port, bytes((value,)))
    pic.set_irq(irq, True)
    pic.set_irq(irq, False)
    return pic


def test_extint_through_lint0_virtual_wire():
    clock, bus = FakeClock(), ApicBus()
    pic = _pic_with_irq(0)
    lapic = LocalApic(0, clock, bus, pic=pic)
    enable(lapic)
    assert lapic.pending_vector() is None  # LINT0 masked at reset
    wr(lapic, REG_LVT_LINT0, 0x700)  # unmasked ExtINT: Linux's virtual wire setup
    assert lapic.pending_vector() == 0x30
    assert lapic.acknowledge() == 0x30  # the PIC's INTA happened
    assert pic.isr == 0x01 and lapic.isr == 0
    assert lapic.pending_vector() is None


def test_pic_passes_through_a_disabled_lapic():
    clock, bus = FakeClock(), ApicBus()
    pic = _pic_with_irq(1)
    lapic = LocalApic(0, clock, bus, pic=pic)  # software-disabled after reset
    assert lapic.pending_vector() == 0x31
    enable(lapic)
    assert lapic.pending_vector() is None  # enabled with LINT0 masked: the wire is cut
    lapic.write_apic_base(0xFEE00100)  # hardware disable
    assert lapic.acknowledge() == 0x31


def test_firmware_defaults_keep_the_virtual_wire_when_the_lapic_is_enabled():
    clock, bus = FakeClock(), ApicBus()
    pic = _pic_with_irq(4)
    lapic = LocalApic(0, clock, bus, pic=pic)
    lapic.apply_firmware_defaults()
    assert rd(lapic, REG_LVT_LINT0) == 0x700 and rd(lapic, 0x360) == 0x400
    enable(lapic)
    assert lapic.acknowledge() == 0x34


def test_ioapic_extint_message_reaches_the_pic():
    clock, bus = FakeClock(), ApicBus()
    pic = _pic_with_irq(3)
    lapic = LocalApic(0, clock, bus, pic=pic)
    enable(lapic)
    assert lapic.pending_vector() is None
    send(bus, 0, mode=7)
    assert lapic.acknowledge() == 0x33


# --- threads and snapshots ------------------------------------------------------------------


def test_wakeup_called_outside_the_lock_when_an_ioapic_pin_rises_in_another_thread():
    clock, bus, (lapic,) = make()
    ioapic = IoApic(bus)
    ioapic.write(0x00, bytes((0x18,)))
    ioapic.write(0x10, (0x45).to_bytes(4, "little"))  # pin 4: edge, fixed, vector 0x45, APIC 0
    woken = threading.Event()
    lock_free = []

    def wakeup():
        # The CPU thread could be querying the LAPIC right now: the callback must not hold the lock.
        done = threading.Event()
        threading.Thread(target=lambda: (lapic.pending_vector(), done.set())).start()
        lock_free.append(done.wait(5))
        woken.set()

    lapic.on_wakeup = wakeup
    thread = threading.Thread(target=ioapic.set_irq, args=(4, True))
    thread.start()
    thread.join(10)
    assert woken.is_set() and lock_free == [True]
    assert lapic.pending_vector() == 0x45


def test_save_restore_round_trips_through_json():
    clock, bus, (lapic,) = make()
    wr(lapic, REG_LVT_TIMER, 1 << 17 | LOCAL_TIMER_VECTOR)
    wr(lapic, REG_TIMER_INITIAL, 12345)
    send(bus, 0x41, level=True)
    lapic.acknowledge()
    send(bus, 0x99)
    state = through_json(lapic.save())
    clock2, bus2 = FakeClock(), ApicBus()
    copy = LocalApic(0, clock2, bus2)
    copy.restore(state)
    assert copy.save() == lapic.save()
    assert copy.next_deadline_ns() == lapic.next_deadline_ns()
    assert copy.pending_vector() == lapic.pending_vector() == 0x99


REGISTERS = [REG_ID, REG_TPR, REG_EOI, REG_LDR, REG_DFR, REG_SVR, REG_ESR, REG_ICR_LOW, REG_ICR_HIGH,
             REG_LVT_TIMER, 0x330, 0x340, REG_LVT_LINT0, 0x360, REG_LVT_ERROR, REG_TIMER_INITIAL,
             REG_TIMER_DIVIDE, REG_IRR, REG_ISR, 0x3F0, 0x7FC]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from(REGISTERS), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("read"), st.integers(0, 0xFFC), st.integers(1, 4)),
    st.tuples(st.just("message"), st.integers(0, 255), st.sampled_from([0, 1, 4, 5, 6, 7])),
    st.tuples(st.just("ack"), st.just(0), st.just(0)),
    st.tuples(st.just("time"), st.integers(0, 10_000_000), st.just(0)),
), max_size=50))
def test_random_register_traffic_never_raises_and_priorities_hold(ops):
    clock, bus, lapics = make(2)
    lapic = lapics[0]
    for op, a, b in ops:
        if op == "write":
            wr(lapic, a, b)
        elif op == "read":
            assert len(lapic.read(a, b)) == b
        elif op == "message":
            send(bus, a, destination=0xFF, mode=b)
        elif op == "time":
            clock.now += a
            lapic.poll(clock.now)
        else:
            expected = lapic.pending_vector()
            vector = lapic.acknowledge()
            if expected is not None:
                assert vector == expected
            if expected is not None and lapic.software_enabled and lapic.hardware_enabled:
                assert lapic.isr & (1 << vector)
        pending = lapic.pending_vector()
        if pending is not None:
            assert pending >> 4 > lapic.ppr >> 4
        assert lapic.isr < 1 << 256 and lapic.irr < 1 << 256
        deadline = lapic.next_deadline_ns()
        assert deadline is None or isinstance(deadline, int)
    copy = LocalApic(0, clock, ApicBus())
    copy.restore(through_json(lapic.save()))
    assert copy.save() == lapic.save()


def test_eoi_that_lets_a_held_interrupt_through_wakes_the_cpu():
    """The serial port's vector waits behind the timer's; the timer's EOI must wake the CPU
    loop, or a timer due again at the next slice boundary wins again and starves it."""
    clock, bus, (lapic,) = make()
    wakeups = []
    lapic.on_wakeup = lambda: wakeups.append(True)
    send(bus, LOCAL_TIMER_VECTOR)
    assert lapic.acknowledge() == LOCAL_TIMER_VECTOR
    send(bus, 0x22)  # held: below the timer vector in service
    assert lapic.pending_vector() is None
    wakeups.clear()
    wr(lapic, REG_EOI, 0)
    assert wakeups == [True]
    assert lapic.pending_vector() == 0x22


def test_eoi_with_nothing_held_does_not_wake_the_cpu():
    clock, bus, (lapic,) = make()
    wakeups = []
    lapic.on_wakeup = lambda: wakeups.append(True)
    send(bus, 0x40)
    assert lapic.acknowledge() == 0x40
    wakeups.clear()
    wr(lapic, REG_EOI, 0)
    assert wakeups == []


def test_lowering_tpr_below_a_held_interrupt_wakes_the_cpu():
    clock, bus, (lapic,) = make()
    wr(lapic, REG_TPR, 0x50)
    wakeups = []
    lapic.on_wakeup = lambda: wakeups.append(True)
    send(bus, 0x42)
    assert lapic.pending_vector() is None
    wakeups.clear()
    wr(lapic, REG_TPR, 0x30)
    assert wakeups == [True] and lapic.pending_vector() == 0x42


def test_a_vector_raised_again_while_pending_does_not_wake_the_cpu_again():
    """A serial port re-raises its interrupt at every byte the guest writes; the CPU loop was
    woken when the vector became pending, and waking it again ends a time slice per byte."""
    clock, bus, (lapic,) = make()
    wakeups = []
    lapic.on_wakeup = lambda: wakeups.append(True)
    send(bus, 0x44)
    send(bus, 0x44)
    assert wakeups == [True]
    assert lapic.acknowledge() == 0x44
    send(bus, 0x44)  # pending again once taken: a new interrupt, which wakes the CPU
    assert wakeups == [True, True]
