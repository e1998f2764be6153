import json

from helpers.state import changed, through_json
from pyvmm.persist import StateError
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.platform import Pic8259Pair

MASTER_CMD, MASTER_DATA, SLAVE_CMD, SLAVE_DATA = 0x20, 0x21, 0xA0, 0xA1
ELCR_MASTER, ELCR_SLAVE = 0x4D0, 0x4D1
MASTER_BASE, SLAVE_BASE = 0x20, 0x28


def _view(pic, port):
    if port in (0x20, 0x21):
        return pic.master_ports, port - 0x20
    if port in (0xA0, 0xA1):
        return pic.slave_ports, port - 0xA0
    if port in (0x4D0, 0x4D1):
        return pic.elcr_ports, port - 0x4D0
    raise AssertionError(port)


def outb(pic, port, value):
    view, offset = _view(pic, port)
    view.write(offset, bytes((value,)))


def inb(pic, port):
    view, offset = _view(pic, port)
    return view.read(offset, 1)[0]


def linux_init(pic, master_mask=0xFB, slave_mask=0xFF, master_icw4=0x01):
    """The sequence of Linux's init_8259A (arch/x86/kernel/i8259.c)."""
    outb(pic, MASTER_DATA, 0xFF)
    outb(pic, SLAVE_DATA, 0xFF)
    outb(pic, MASTER_CMD, 0x11)          # ICW1: edge, cascade, ICW4 needed
    outb(pic, MASTER_DATA, MASTER_BASE)  # ICW2
    outb(pic, MASTER_DATA, 0x04)         # ICW3: slave on IR2
    outb(pic, MASTER_DATA, master_icw4)  # ICW4: 8086 mode (+ auto-EOI if asked)
    outb(pic, SLAVE_CMD, 0x11)
    outb(pic, SLAVE_DATA, SLAVE_BASE)
    outb(pic, SLAVE_DATA, 0x02)          # slave ID 2
    outb(pic, SLAVE_DATA, 0x01)
    outb(pic, MASTER_DATA, master_mask)
    outb(pic, SLAVE_DATA, slave_mask)


def make_pic(**kwargs):
    pic = Pic8259Pair()
    linux_init(pic, **kwargs)
    return pic


def pulse(pic, irq):
    pic.set_irq(irq, True)
    pic.set_irq(irq, False)


def read_isr(pic, cmd):
    outb(pic, cmd, 0x0B)
    value = inb(pic, cmd)
    outb(pic, cmd, 0x0A)
    return value


# --- initialization and registers -----------------------------------------------------------


def test_linux_probe_reads_back_the_mask():
    pic = Pic8259Pair()
    outb(pic, MASTER_DATA, 0xFF)
    assert inb(pic, MASTER_DATA) == 0xFF  # Linux's probe_8259A: else "Using NULL legacy PIC"
    outb(pic, MASTER_DATA, 0xA5)
    assert inb(pic, MASTER_DATA) == 0xA5


def test_init_sequence_does_not_touch_imr_and_sets_vector_bases():
    pic = make_pic(master_mask=0xFA, slave_mask=0xEF)
    assert pic.imr == 0xEFFA
    pulse(pic, 0)
    assert pic.acknowledge() == MASTER_BASE
    outb(pic, MASTER_CMD, 0x60)
    pulse(pic, 12)
    assert pic.acknowledge() == SLAVE_BASE + 4


def test_icw1_clears_imr_isr_and_pending_edges():
    pic = make_pic(master_mask=0x00)
    pulse(pic, 1)
    pulse(pic, 3)
    pic.acknowledge()
    assert pic.isr & 0x02 and pic.irr & 0x08
    outb(pic, MASTER_CMD, 0x11)
    assert (pic.isr & 0xFF, pic.irr & 0xFF & ~0x04, pic.imr & 0xFF) == (0, 0, 0)


def test_ocw3_selects_irr_or_isr_on_the_command_port():
    pic = make_pic(master_mask=0x00)
    pulse(pic, 1)
    pulse(pic, 5)
    assert inb(pic, MASTER_CMD) == 0x22  # IRR is the default
    assert pic.acknowledge() == MASTER_BASE + 1
    assert read_isr(pic, MASTER_CMD) == 0x02
    assert inb(pic, MASTER_CMD) == 0x20


def test_elcr_reserved_bits_stay_edge():
    pic = Pic8259Pair()
    outb(pic, ELCR_MASTER, 0xFF)
    outb(pic, ELCR_SLAVE, 0xFF)
    assert inb(pic, ELCR_MASTER) == 0xF8  # IRQ 0-2 edge only
    assert inb(pic, ELCR_SLAVE) == 0xDE   # IRQ 8 and 13 edge only


# --- priority, EOI and nesting --------------------------------------------------------------


def test_edge_irq_acknowledge_moves_irr_to_isr():
    pic = make_pic(master_mask=0x00)
    assert not pic.interrupt_pending()
    pulse(pic, 4)
    assert pic.interrupt_pending()
    assert pic.pending_vector() == MASTER_BASE + 4
    assert pic.acknowledge() == MASTER_BASE + 4
    assert (pic.irr & 0x10, pic.isr & 0x10) == (0, 0x10)
    assert not pic.interrupt_pending()
    outb(pic, MASTER_CMD, 0x20)  # non-specific EOI
    assert pic.isr == 0


def test_in_service_blocks_lower_priority_but_not_higher():
    pic = make_pic(master_mask=0x00)
    pulse(pic, 3)
    assert pic.acknowledge() == MASTER_BASE + 3
    pulse(pic, 5)
    assert not pic.interrupt_pending()  # IR5 is below the in-service IR3
    pulse(pic, 1)
    assert pic.acknowledge() == MASTER_BASE + 1  # nested: IR1 outranks IR3
    outb(pic, MASTER_CMD, 0x20)  # non-specific EOI retires IR1, the highest in service
    assert pic.isr & 0xFF == 0x08
    assert not pic.interrupt_pending()
    outb(pic, MASTER_CMD, 0x63)  # specific EOI for IR3
    assert pic.acknowledge() == MASTER_BASE + 5


def test_masked_request_waits_in_irr():
    pic = make_pic(master_mask=0xFF)
    pulse(pic, 6)
    assert not pic.interrupt_pending() and pic.irr & 0x40
    outb(pic, MASTER_DATA, 0xBF)
    assert pic.acknowledge() == MASTER_BASE + 6


def test_slave_irq_goes_through_cascade_and_needs_both_eois():
    pic = make_pic(master_mask=0xFB, slave_mask=0x00)
    pulse(pic, 14)
    assert pic.interrupt_pending()
    assert pic.acknowledge() == SLAVE_BASE + 6
    assert pic.isr == (0x40 << 8) | 0x04
    pulse(pic, 15)
    assert not pic.interrupt_pending()  # master IR2 in service blocks the cascade
    outb(pic, SLAVE_CMD, 0x66)  # Linux: specific EOI on the slave, then on master IR2
    assert not pic.interrupt_pending()
    outb(pic, MASTER_CMD, 0x62)
    assert pic.acknowledge() == SLAVE_BASE + 7


def test_edge_line_held_high_interrupts_once():
    pic = make_pic(master_mask=0x00)
    pic.set_irq(4, True)
    assert pic.acknowledge() == MASTER_BASE + 4
    outb(pic, MASTER_CMD, 0x20)
    assert not pic.interrupt_pending()
    pic.set_irq(4, True)  # no new edge
    assert not pic.interrupt_pending()
    pic.set_irq(4, False)
    pic.set_irq(4, True)
    assert pic.interrupt_pending()


def test_level_mode_reasserts_after_eoi_and_drops_with_the_line():
    pic = make_pic(master_mask=0x00, slave_mask=0x00)
    outb(pic, ELCR_SLAVE, 0x02)  # IRQ 9 level (ACPI SCI)
    pic.set_irq(9, True)
    assert pic.acknowledge() == SLAVE_BASE + 1
    outb(pic, SLAVE_CMD, 0x20)
    outb(pic, MASTER_CMD, 0x20)
    assert pic.pending_vector() == SLAVE_BASE + 1  # still asserted
    pic.set_irq(9, False)
    assert not pic.interrupt_pending()


def test_request_gone_before_inta_gives_spurious_irq7_without_isr():
    pic = make_pic(master_mask=0x00)
    outb(pic, ELCR_MASTER, 0x20)  # IRQ 5 level
    pic.set_irq(5, True)
    assert pic.interrupt_pending()
    pic.set_irq(5, False)
    assert pic.acknowledge() == MASTER_BASE + 7
    assert read_isr(pic, MASTER_CMD) == 0  # Linux checks this to call it spurious


def test_ltim_makes_every_input_level_triggered():
    pic = Pic8259Pair()
    outb(pic, MASTER_CMD, 0x19)  # ICW1 with LTIM
    outb(pic, MASTER_DATA, 0x20)
    outb(pic, MASTER_DATA, 0x04)
    outb(pic, MASTER_DATA, 0x01)
    outb(pic, MASTER_DATA, 0x00)
    pic.set_irq(1, True)
    pic.acknowledge()
    outb(pic, MASTER_CMD, 0x20)
    assert pic.interrupt_pending()


def test_auto_eoi_leaves_isr_clear():
    pic = make_pic(master_mask=0x00, master_icw4=0x03)
    pulse(pic, 3)
    assert pic.acknowledge() == MASTER_BASE + 3
    assert pic.isr == 0
    pulse(pic, 5)
    assert pic.acknowledge() == MASTER_BASE + 5


def test_rotate_on_non_specific_eoi_makes_the_served_irq_lowest():
    pic = make_pic(master_mask=0x00)
    pulse(pic, 0)
    assert pic.acknowledge() == MASTER_BASE
    pulse(pic, 0)
    pulse(pic, 1)
    outb(pic, MASTER_CMD, 0xA0)  # rotate on non-specific EOI: IR0 becomes lowest
    assert pic.acknowledge() == MASTER_BASE + 1
    outb(pic, MASTER_CMD, 0x20)
    assert pic.acknowledge() == MASTER_BASE


def test_set_priority_command():
    pic = make_pic(master_mask=0x00)
    outb(pic, MASTER_CMD, 0xC4)  # IR4 lowest, so IR5 highest
    pulse(pic, 1)
    pulse(pic, 6)
    assert pic.acknowledge() == MASTER_BASE + 6


def test_special_mask_mode_lets_lower_priority_in():
    pic = make_pic(master_mask=0x00)
    pulse(pic, 1)
    assert pic.acknowledge() == MASTER_BASE + 1
    pulse(pic, 4)
    assert not pic.interrupt_pending()
    outb(pic, MASTER_CMD, 0x68)   # set special mask mode
    outb(pic, MASTER_DATA, 0x02)  # mask the in-service level
    assert pic.acknowledge() == MASTER_BASE + 4
    outb(pic, MASTER_CMD, 0x48)   # reset special mask mode
    outb(pic, MASTER_CMD, 0x64)
    outb(pic, MASTER_CMD, 0x61)
    assert pic.isr == 0


def test_poll_command_acts_as_inta():
    pic = make_pic(master_mask=0x00)
    pulse(pic, 6)
    outb(pic, MASTER_CMD, 0x0C)
    assert inb(pic, MASTER_CMD) == 0x86
    assert pic.isr & 0x40
    outb(pic, MASTER_CMD, 0x0C)
    assert inb(pic, MASTER_CMD) == 0x00


# --- threads and snapshots ------------------------------------------------------------------


def test_wakeup_called_when_output_rises_from_another_thread():
    pic = make_pic(master_mask=0x00)
    woken = threading.Event()
    pic.on_wakeup = woken.set
    thread = threading.Thread(target=pulse, args=(pic, 4))
    thread.start()
    thread.join()
    assert woken.is_set()
    woken.clear()
    pulse(pic, 5)  # output already asserted: no new wake-up needed
    assert not woken.is_set()


def test_irq2_and_out_of_range_are_refused():
    pic = Pic8259Pair()
    for irq in (2, -1, 16):
        with pytest.raises(ValueError):
            pic.set_irq(irq, True)


def test_save_restore_round_trips_through_json():
    pic = make_pic(master_mask=0x00, slave_mask=0x00)
    outb(pic, ELCR_SLAVE, 0x0A)
    pulse(pic, 1)
    pulse(pic, 3)
    pulse(pic, 10)
    pic.acknowledge()
    state = through_json(pic.save())
    copy = Pic8259Pair()
    copy.restore(state)
    assert copy.save() == pic.save()
    assert [copy.acknowledge() for _ in range(1)] == [pic.acknowledge()]


def test_restore_rejects_garbage():
    with pytest.raises(StateError, match="i8259_pair state expected"):
        Pic8259Pair().restore({"master": {}, "slave": {}})
    pair = Pic8259Pair()
    bad = changed(pair.save(), slave=changed(pair.save().slave, elcr=0xFF))
    before = pair.save()
    with pytest.raises(StateError, match="elcr: 0xff sets bits outside the slave's ELCR"):
        pair.restore(bad)
    assert pair.save() == before


PORTS = [MASTER_CMD, MASTER_DATA, SLAVE_CMD, SLAVE_DATA, ELCR_MASTER, ELCR_SLAVE]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("out"), st.sampled_from(PORTS), st.integers(0, 255)),
    st.tuples(st.just("in"), st.sampled_from(PORTS), st.just(0)),
    st.tuples(st.just("irq"), st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]), st.booleans()),
    st.tuples(st.just("ack"), st.just(0), st.just(0)),
), max_size=60))
def test_random_traffic_never_raises_and_state_stays_consistent(ops):
    pic = Pic8259Pair()
    for op, a, b in ops:
        if op == "out":
            outb(pic, a, b)
        elif op == "in":
            inb(pic, a)
        elif op == "irq":
            pic.set_irq(a, b)
        else:
            expected = pic.pending_vector()
            vector = pic.acknowledge()
            if expected is not None:
                assert vector == expected
        assert 0 <= pic.irr <= 0xFFFF and 0 <= pic.isr <= 0xFFFF
        # The master's cascade input mirrors the slave's INT output.
        assert bool(pic.irr & 0x04) == (pic.slave.highest_request() is not None)
        assert pic.interrupt_pending() == (pic.pending_vector() is not None)
    copy = Pic8259Pair()
    copy.restore(through_json(pic.save()))
    assert copy.save() == pic.save()
