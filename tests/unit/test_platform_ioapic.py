import json

from helpers.state import changed, through_json
from pyvmm.persist import StateError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.platform import ApicBus, IoApic, IsaIrqRouter, LocalApic, Pic8259Pair
from pyvmm.platform.lapic import REG_EOI, REG_LDR, REG_SVR

EDGE, LEVEL, MASKED, LOGICAL = 0, 1 << 15, 1 << 16, 1 << 11
REMOTE_IRR = 1 << 14


class FakeClock:
    now = 0

    def __call__(self):
        return self.now


def make(cpus=1):
    bus = ApicBus()
    lapics = [LocalApic(i, FakeClock(), bus) for i in range(cpus)]
    for lapic in lapics:
        lapic.write(REG_SVR, (0x1FF).to_bytes(4, "little"))
    return bus, IoApic(bus), lapics


def ioapic_read(ioapic, index):
    ioapic.write(0x00, bytes((index,)))
    return int.from_bytes(ioapic.read(0x10, 4), "little")


def ioapic_write(ioapic, index, value):
    ioapic.write(0x00, index.to_bytes(4, "little"))  # Linux writes IOREGSEL as a dword
    ioapic.write(0x10, value.to_bytes(4, "little"))


def program(ioapic, pin, vector, flags=0, destination=0):
    """Linux's ioapic_write_entry order: high half first, then low."""
    ioapic_write(ioapic, 0x11 + 2 * pin, destination << 24)
    ioapic_write(ioapic, 0x10 + 2 * pin, vector | flags)


def eoi(lapic):
    lapic.write(REG_EOI, bytes(4))


def take(lapic):
    vectors = []
    while lapic.pending_vector() is not None:
        vectors.append(lapic.acknowledge())
    return vectors


def drain(lapic):
    """Acknowledge and EOI everything pending, highest first."""
    vectors = []
    while lapic.pending_vector() is not None:
        vectors.append(lapic.acknowledge())
        eoi(lapic)
    return vectors


def test_id_version_and_reset_entries():
    bus, ioapic, _ = make()
    assert ioapic_read(ioapic, 0x01) == 0x00170011
    ioapic_write(ioapic, 0x00, 0x0A000000)
    assert ioapic_read(ioapic, 0x00) == 0x0A000000
    assert ioapic_read(ioapic, 0x02) == 0x0A000000
    ioapic_write(ioapic, 0x01, 0)  # read-only
    assert ioapic_read(ioapic, 0x01) == 0x00170011
    for pin in range(24):
        assert ioapic.redirection(pin) == MASKED
    assert ioapic.read(0x00, 4)[0] == 0x01  # IOREGSEL reads back the last selection


def test_edge_pin_delivers_once_per_rising_edge():
    bus, ioapic, (lapic,) = make()
    program(ioapic, 4, 0x34)
    ioapic.set_irq(4, True)
    assert take(lapic) == [0x34]
    eoi(lapic)
    ioapic.set_irq(4, True)  # still high: no new edge
    assert take(lapic) == []
    ioapic.set_irq(4, False)
    ioapic.set_irq(4, True)
    assert take(lapic) == [0x34]
    assert not ioapic.redirection(4) & REMOTE_IRR


def test_masked_edge_is_lost():
    bus, ioapic, (lapic,) = make()
    program(ioapic, 4, 0x34, MASKED)
    ioapic.set_irq(4, True)
    ioapic.set_irq(4, False)
    program(ioapic, 4, 0x34)
    assert take(lapic) == []


def test_level_pin_remote_irr_and_eoi_redelivery():
    bus, ioapic, (lapic,) = make()
    program(ioapic, 9, 0x39, LEVEL)
    ioapic.set_irq(9, True)
    assert ioapic.redirection(9) & REMOTE_IRR
    assert lapic.tmr & (1 << 0x39)
    assert take(lapic) == [0x39]
    ioapic.set_irq(9, True)
    assert take(lapic) == []  # Remote IRR holds it back
    eoi(lapic)  # level vector: EOI broadcast -> still asserted -> delivered again
    assert ioapic.redirection(9) & REMOTE_IRR
    assert take(lapic) == [0x39]
    ioapic.set_irq(9, False)
    eoi(lapic)
    assert not ioapic.redirection(9) & REMOTE_IRR
    assert take(lapic) == []


def test_masked_level_pin_delivers_when_unmasked():
    bus, ioapic, (lapic,) = make()
    program(ioapic, 10, 0x3A, LEVEL | MASKED)
    ioapic.set_irq(10, True)
    assert take(lapic) == []
    program(ioapic, 10, 0x3A, LEVEL)
    assert take(lapic) == [0x3A]


def test_switching_to_edge_clears_remote_irr():
    bus, ioapic, (lapic,) = make()
    program(ioapic, 11, 0x3B, LEVEL)
    ioapic.set_irq(11, True)
    assert ioapic.redirection(11) & REMOTE_IRR
    ioapic_write(ioapic, 0x10 + 22, 0x3B | MASKED)  # Linux's trick for IOAPICs without an EOI register
    assert not ioapic.redirection(11) & REMOTE_IRR
    ioapic_write(ioapic, 0x10 + 22, 0x3B | REMOTE_IRR)  # Remote IRR is read-only
    assert not ioapic.redirection(11) & REMOTE_IRR


def test_destinations_physical_and_logical():
    bus, ioapic, lapics = make(cpus=3)
    for i, lapic in enumerate(lapics):
        lapic.write(REG_LDR, ((1 << i) << 24).to_bytes(4, "little"))
    program(ioapic, 5, 0x55, destination=2)
    program(ioapic, 6, 0x66, LOGICAL, destination=0x02)
    program(ioapic, 7, 0x77, destination=0xFF)
    for pin in (5, 6, 7):
        ioapic.set_irq(pin, True)
    assert [drain(l) for l in lapics] == [[0x77], [0x77, 0x66], [0x77, 0x55]]


def test_nmi_delivery_mode():
    bus, ioapic, (lapic,) = make()
    program(ioapic, 3, 0, 4 << 8)
    ioapic.set_irq(3, True)
    assert lapic.take_nmi()


def test_pin_out_of_range():
    bus, ioapic, _ = make()
    with pytest.raises(ValueError):
        ioapic.set_irq(24, True)


def test_save_restore_round_trips_through_json():
    bus, ioapic, (lapic,) = make()
    program(ioapic, 9, 0x39, LEVEL)
    ioapic.set_irq(9, True)
    state = through_json(ioapic.save())
    copy = IoApic(ApicBus())
    copy.restore(state)
    assert copy.save() == ioapic.save()
    with pytest.raises(StateError, match="redirection: 3 entries, this IOAPIC has 24 pins"):
        copy.restore(changed(copy.save(), redirection=(0,) * 3))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("reg"), st.integers(0, 0x3F), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("mmio"), st.integers(0, 0xFFC), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("pin"), st.integers(0, 23), st.booleans()),
    st.tuples(st.just("eoi"), st.integers(0, 255), st.just(0)),
), max_size=60))
def test_random_traffic_never_raises_and_remote_irr_only_on_level_pins(ops):
    bus, ioapic, (lapic,) = make()
    for op, a, b in ops:
        if op == "reg":
            ioapic_write(ioapic, a, b)
            ioapic_read(ioapic, a)
        elif op == "mmio":
            ioapic.write(a, b.to_bytes(4, "little"))
            ioapic.read(a, 4)
        elif op == "pin":
            ioapic.set_irq(a, b)
        else:
            ioapic.end_of_interrupt(a)
        for pin in range(24):
            entry = ioapic.redirection(pin)
            if entry & REMOTE_IRR:
                assert entry & LEVEL


# --- the ISA router -------------------------------------------------------------------------


def test_router_irq0_goes_to_pic_irq0_and_ioapic_pin2():
    bus, ioapic, (lapic,) = make()
    pic = Pic8259Pair()
    router = IsaIrqRouter(pic, ioapic)
    program(ioapic, 2, 0x30)
    program(ioapic, 0, 0x99)
    router.line(0).trigger()
    assert pic.irr & 0x01
    assert take(lapic) == [0x30]
    router.line(4).set_level(True)
    assert pic.irr & 0x10 and ioapic.asserted(4)
    router.gsi_line(16).set_level(True)
    assert ioapic.asserted(16)
    assert router.line(4) is router.line(4)
    for bad in (2, 16, -1):
        with pytest.raises(ValueError):
            router.line(bad)
    for bad in (15, 24):
        with pytest.raises(ValueError):
            router.gsi_line(bad)


def test_pit_irq0_reaches_the_lapic_through_ioapic_pin2_as_in_check_timer():
    """Linux's check_timer: IRQ0 masked in the (auto-EOI) PIC, IOAPIC pin 2 edge -> vector 0x30."""
    from pyvmm.platform import Pit8254

    clock = FakeClock()
    bus = ApicBus()
    pic = Pic8259Pair()
    lapic = LocalApic(0, clock, bus, pic=pic)
    lapic.write(REG_SVR, (0x1FF).to_bytes(4, "little"))
    ioapic = IoApic(bus)
    router = IsaIrqRouter(pic, ioapic)
    for port, value in ((1, 0xFF), (0, 0x11), (1, 0x30), (1, 0x04), (1, 0x03), (1, 0xFF)):
        pic.master_ports.write(port, bytes((value,)))
    pit = Pit8254(router.line(0), clock)
    pit.write(3, b"\x34")
    pit.write(0, bytes((4773 & 0xFF,)))
    pit.write(0, bytes((4773 >> 8,)))
    program(ioapic, 2, 0x30)
    ticks = 0
    while clock.now < 160_000_000:  # delay_with_tsc: 40e9 / HZ cycles at 1 GHz
        deadline = pit.next_deadline_ns(clock.now)
        clock.now = deadline  # the CPU sleeps in HLT until the next timer event
        pit.poll(clock.now)
        if lapic.pending_vector() is not None:
            assert lapic.acknowledge() == 0x30
            eoi(lapic)
            ticks += 1
    assert ticks == 40
    assert not pic.interrupt_pending()  # the PIC saw IRQ0 but has it masked


def test_device_threads_raising_lines_while_the_cpu_acknowledges_do_not_deadlock():
    import threading

    bus = ApicBus()
    pic = Pic8259Pair()
    lapic = LocalApic(0, FakeClock(), bus, pic=pic)
    lapic.write(REG_SVR, (0x1FF).to_bytes(4, "little"))
    lapic.write(0x350, (0x700).to_bytes(4, "little"))  # the virtual wire too
    ioapic = IoApic(bus)
    router = IsaIrqRouter(pic, ioapic)
    for port, value in ((0, 0x11), (1, 0x20), (1, 0x04), (1, 0x01), (1, 0x00)):
        pic.master_ports.write(port, bytes((value,)))
    program(ioapic, 4, 0x44)
    program(ioapic, 3, 0x53, LEVEL)
    woken = threading.Event()
    lapic.on_wakeup = woken.set
    pic.on_wakeup = woken.set
    stop = threading.Event()

    def device(irq):
        line = router.line(irq)
        while not stop.is_set():
            line.set_level(True)
            line.set_level(False)

    threads = [threading.Thread(target=device, args=(irq,)) for irq in (3, 4)]
    for thread in threads:
        thread.start()
    delivered = 0
    try:
        for _ in range(3000):
            if lapic.pending_vector() is not None:
                lapic.acknowledge()
                eoi(lapic)
                pic.master_ports.write(0, b"\x20")
                delivered += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert delivered > 0 and woken.is_set()
