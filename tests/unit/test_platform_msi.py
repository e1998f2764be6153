"""MSI on the software platform: the message decoded and delivered to the right LAPIC."""

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.bus.interrupt import MsiVector, NullMsiVector
from pyvmm.platform import ApicBus, LocalApic
from pyvmm.platform.lapic import REG_EOI, REG_LDR, REG_SVR, REG_TMR
from pyvmm.platform.msi import SoftwareMsiVector, decode_msi


class FakeClock:
    def __call__(self):
        return 0


def wr(lapic, reg, value):
    lapic.write(reg, value.to_bytes(4, "little"))


def make(count=2):
    bus = ApicBus()
    lapics = [LocalApic(i, FakeClock(), bus) for i in range(count)]
    for i, lapic in enumerate(lapics):
        wr(lapic, REG_SVR, 0x1FF)
        wr(lapic, REG_LDR, (1 << i) << 24)  # flat logical: CPU i is bit i
    return bus, lapics


def take(lapic):
    """Acknowledge and EOI everything pending (in service, a vector would block its class)."""
    vectors = []
    while lapic.pending_vector() is not None:
        vectors.append(lapic.acknowledge())
        wr(lapic, REG_EOI, 0)
    return vectors


def address(dest, logical=False):
    return 0xFEE00000 | dest << 12 | (4 if logical else 0)


def test_decode_fields():
    message = decode_msi(0xFEE0300C, 0x0000C1A5)  # dest 3, RH + logical; level, lowest priority
    assert message.vector == 0xA5
    assert message.delivery_mode == 1
    assert message.destination == 3
    assert message.logical is True
    assert message.level_triggered is True
    assert decode_msi(0xFEE00000, 0x41).logical is False


@pytest.mark.parametrize("addr", [0, 0xFED00000, 0xFEF00000, 0x1_FEE00000])
def test_addresses_outside_the_interrupt_window_decode_to_nothing(addr):
    assert decode_msi(addr, 0x41) is None


def test_physical_destination_reaches_only_that_lapic():
    bus, (cpu0, cpu1) = make()
    vector = SoftwareMsiVector(bus)
    vector.configure(address(1), 0x41, masked=False)
    vector.trigger()
    assert take(cpu0) == [] and take(cpu1) == [0x41]
    vector.configure(address(0), 0x52, masked=False)
    vector.trigger()
    assert take(cpu0) == [0x52] and take(cpu1) == []


def test_logical_destination_and_broadcast():
    bus, (cpu0, cpu1) = make()
    vector = SoftwareMsiVector(bus)
    vector.configure(address(0b10, logical=True), 0x61, masked=False)
    vector.trigger()
    assert take(cpu0) == [] and take(cpu1) == [0x61]
    vector.configure(address(0xFF), 0x62, masked=False)  # physical broadcast
    vector.trigger()
    assert take(cpu0) == [0x62] and take(cpu1) == [0x62]


def test_level_trigger_bit_sets_tmr_and_nmi_mode_is_an_nmi():
    bus, (cpu0, _) = make()
    vector = SoftwareMsiVector(bus)
    vector.configure(address(0), 0xC000 | 0x71, masked=False)
    vector.trigger()
    tmr = int.from_bytes(cpu0.read(REG_TMR + 0x30, 4), "little")  # vectors 0x60-0x7f
    assert tmr & 1 << (0x71 - 0x60)
    vector.configure(address(0), 4 << 8, masked=False)
    vector.trigger()
    assert cpu0.take_nmi() is True


def test_masked_unprogrammed_and_closed_vectors_deliver_nothing():
    bus, (cpu0, _) = make()
    vector = SoftwareMsiVector(bus)
    vector.trigger()  # fresh: masked
    vector.configure(address(0), 0x41, masked=True)
    vector.trigger()
    vector.configure(0, 0, masked=False)  # unmasked but never programmed
    vector.trigger()
    assert take(cpu0) == [] and vector.dropped == 1
    vector.configure(address(0), 0x41, masked=False)
    vector.close()
    vector.trigger()
    assert take(cpu0) == [] and vector.delivered == 0


def test_trigger_wakes_a_halted_software_cpu():
    bus, (cpu0, _) = make()
    woken = threading.Event()
    cpu0.on_wakeup = woken.set
    vector = SoftwareMsiVector(bus)
    vector.configure(address(0), 0x41, masked=False)
    thread = threading.Thread(target=vector.trigger)  # devices trigger from their I/O threads
    thread.start()
    thread.join()
    assert woken.is_set()
    assert take(cpu0) == [0x41]


def test_bad_message_is_a_one_line_value_error():
    vector = SoftwareMsiVector(ApicBus())
    with pytest.raises(ValueError, match="out of range"):
        vector.configure(1 << 64, 0, masked=False)
    with pytest.raises(ValueError, match="out of range"):
        vector.configure(0xFEE00000, 1 << 32, masked=False)


@given(st.integers(0, 0xFF), st.integers(16, 0xFF), st.booleans())
def test_any_physical_message_reaches_exactly_its_destination(dest, vec, level):
    bus, lapics = make(3)
    vector = SoftwareMsiVector(bus)
    vector.configure(address(dest), vec | (0xC000 if level else 0), masked=False)
    vector.trigger()
    expected = [[vec] if dest in (i, 0xFF) else [] for i in range(3)]
    assert [take(lapic) for lapic in lapics] == expected


def test_both_implementations_satisfy_the_protocol():
    vectors: list[MsiVector] = [SoftwareMsiVector(ApicBus()), NullMsiVector()]
    for vector in vectors:
        assert vector.eventfd is None
        vector.configure(0xFEE00000, 0x41, masked=False)
        vector.trigger()
        vector.close()
