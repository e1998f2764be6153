import pytest

from pyvmm.bus import PioBus
from pyvmm.devices.legacy import DebugExit, Port80, exit_status


def make_debug_exit():
    values = []
    return DebugExit(values.append), values


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


def test_debug_exit_save_restore_is_trivial():
    device, _ = make_debug_exit()
    state = device.save()
    assert state == {}
    device.restore(state)


def test_port80_keeps_last_value_and_counts_writes():
    port = Port80()
    assert port.read(0, 1) == b"\x00"
    port.write(0, b"\x12")
    port.write(0, b"\x34")
    assert port.read(0, 1) == b"\x34"
    assert port.writes == 2
    assert port.read(0, 2) == b"\x34\xff"


def test_port80_save_restore():
    port = Port80()
    port.write(0, b"\xaa")
    clone = Port80()
    clone.restore(port.save())
    assert clone.read(0, 1) == b"\xaa"
    assert clone.writes == 1
    with pytest.raises(ValueError):
        clone.restore({"last_value": 256})
