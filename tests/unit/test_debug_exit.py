import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers.state import through_json
from pyvmm.bus import PioBus
from pyvmm.devices.legacy import DebugExitPort, Port80, exit_status
from pyvmm.devices.legacy.acpi_power import AcpiPower, AcpiPowerState
from pyvmm.devices.legacy.debug_exit import DebugExitState
from pyvmm.devices.legacy.guest_notify import GuestNotify, GuestNotifyState
from pyvmm.devices.legacy.port80 import Port80State
from pyvmm.devices.legacy.pvpanic import PvPanic, PvPanicState
from pyvmm.persist import StateError


def make_debug_exit():
    values = []
    return DebugExitPort(values.append), values


@pytest.mark.parametrize("data, value", [
    (b"\x01", 0x01),
    (b"\x34\x12", 0x1234),
    (b"\x78\x56\x34\x12", 0x12345678),
    (b"\x00", 0),
])
def test_debug_exit_write_sizes_little_endian(data, value):
    device, values = make_debug_exit()
    device.write(0, data)
    assert values == [value]


def test_debug_exit_through_the_bus_at_0xf4():
    device, values = make_debug_exit()
    bus = PioBus()
    bus.register(0xF4, 4, device, "debug-exit")
    bus.write(0xF4, b"\x10")
    bus.write(0xF4, b"\x02\x01")
    bus.write(0xF4, b"\x04\x00\x00\x00")
    assert values == [0x10, 0x102, 0x4]
    assert bus.read(0xF4, 4) == b"\xff\xff\xff\xff"


def test_debug_exit_reads_all_ones_and_empty_write_is_ignored():
    device, values = make_debug_exit()
    assert device.read(0, 1) == b"\xff"
    assert device.read(0, 2) == b"\xff\xff"
    device.write(0, b"")
    assert values == []


@pytest.mark.parametrize("value, status", [(0, 1), (1, 3), (2, 5), (0x7F, 255), (0x80, 257), (0x1234, 0x2469)])
def test_exit_status_is_shifted_and_odd_unmasked(value, status):
    assert exit_status(value) == status


def test_debug_exit_state_is_empty_but_typed():
    device, _ = make_debug_exit()
    state = through_json(device.save())
    assert state == DebugExitState()
    device.restore(state)
    with pytest.raises(StateError, match="this is a 'port80' state"):
        DebugExitState.from_dict(Port80().save().to_dict())


def test_port80_keeps_last_value_and_counts_writes():
    port = Port80()
    assert port.read(0, 1) == b"\x00"
    port.write(0, b"\x12")
    port.write(0, b"\x34")
    assert port.read(0, 1) == b"\x34"
    assert port.writes == 2
    assert port.read(0, 2) == b"\x34\xff" and port.read(0, 4) == b"\x34\xff\xff\xff" and port.read(0, 0) == b""


def test_port80_save_restore():
    port = Port80()
    port.write(0, b"\xaa")
    clone = Port80()
    clone.restore(through_json(port.save()))
    assert clone.read(0, 1) == b"\xaa"
    assert clone.writes == 1
    assert clone.save() == port.save()
    with pytest.raises(StateError, match="last_value: 256 is outside"):
        Port80State(last_value=256, writes=0)


@given(st.lists(st.binary(max_size=2), max_size=20))
def test_port80_any_state_round_trips(writes):
    port = Port80()
    for data in writes:
        port.write(0, data)
    clone = Port80()
    clone.restore(through_json(port.save()))
    assert clone.save() == port.save()


def test_stateless_legacy_devices_and_guest_notify_round_trip():
    power = AcpiPower(lambda: None, lambda: None, 6)
    power.restore(through_json(power.save()))
    assert power.save() == AcpiPowerState()
    panic = PvPanic(lambda: None)
    panic.restore(through_json(panic.save()))
    assert panic.save() == PvPanicState()

    notified = []
    notify = GuestNotify(lambda: notified.append(1))
    notify.write(0, b"\x01")
    notify.write(1, b"\x07")
    fresh = GuestNotify(lambda: notified.append(2))
    fresh.restore(through_json(notify.save()))
    assert fresh.save() == GuestNotifyState(init_started=True, command_status=7)
    fresh.write(0, b"\x01")
    assert notified == [1]  # init had started before the save: no second notice
    with pytest.raises(StateError, match="command_status: 256 is outside"):
        GuestNotifyState(init_started=False, command_status=256)
