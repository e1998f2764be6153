"""The test-kernel devices (--test-devices): fw_cfg and the ISA test device, on the port bus."""

import pytest

from helpers.state import through_json
from pyvmm.bus import PioBus
from pyvmm.config import MachineConfig
from pyvmm.devices.legacy.fw_cfg import FwCfg, FwCfgPorts, FwCfgState, machine_items
from pyvmm.devices.legacy.test_device import TestDevice, TestDeviceIrqPorts, TestDeviceState
from pyvmm.persist import StateError
from pyvmm.restore import expected_device_ids
from pyvmm.vm_state import MachineDescription


def fw_cfg_bus(ram=64 << 20, cpus=2, max_cpus=4):
    bus = PioBus()
    bus.register(0x510, 2, FwCfgPorts(FwCfg(machine_items(ram, cpus, max_cpus))), "fw-cfg")
    return bus


def read_item(bus, key, length):
    bus.write(0x510, key.to_bytes(2, "little"))
    return bytes(bus.read(0x511, 1)[0] for _ in range(length))


def test_fw_cfg_signature_id_cpus_and_ram():
    bus = fw_cfg_bus()
    assert read_item(bus, 0x00, 4) == b"QEMU"
    assert int.from_bytes(read_item(bus, 0x01, 4), "little") == 1      # traditional interface, no DMA
    assert int.from_bytes(read_item(bus, 0x03, 8), "little") == 64 << 20
    assert int.from_bytes(read_item(bus, 0x05, 2), "little") == 2
    assert int.from_bytes(read_item(bus, 0x0F, 2), "little") == 4


def test_fw_cfg_select_rewinds_and_reads_past_the_end_or_unknown_keys_are_zero():
    bus = fw_cfg_bus()
    assert read_item(bus, 0x00, 2) == b"QE"
    assert read_item(bus, 0x00, 6) == b"QEMU\0\0"       # selecting again starts over; then zeros
    assert read_item(bus, 0x1234, 3) == b"\0\0\0"
    assert read_item(bus, 0x4000, 4) == b"QEMU"         # the write-channel bit selects the same item


def test_fw_cfg_ignores_data_writes_and_byte_selector_writes():
    bus = fw_cfg_bus()
    bus.write(0x510, b"\x05\x00")
    bus.write(0x511, b"\x07")
    bus.write(0x510, b"\x00")                           # an 8-bit selector write is not a selection
    assert bus.read(0x511, 1) == b"\x02"
    assert bus.read(0x510, 1) == b"\xff"


def test_fw_cfg_cursor_saved_and_restored():
    device = FwCfg(machine_items(64 << 20, 1, 1))
    device.select(0x00)
    device.read_data(1)
    state = through_json(device.save())
    other = FwCfg(machine_items(64 << 20, 1, 1))
    other.restore(state)
    assert other.read_data(3) == b"EMU"
    with pytest.raises(StateError, match="selector"):
        FwCfgState(selector=0x10000, offset=0)


class Line:
    def __init__(self):
        self.levels = []

    def set_level(self, high):
        self.levels.append(high)

    def trigger(self):
        self.levels += [True, False]


def make_test_device(lines):
    device = TestDevice(lines)
    bus = PioBus()
    bus.register(0xE0, 12, device, "pc-testdev")
    bus.register(0x2000, 16, TestDeviceIrqPorts(device), "pc-testdev-irq")
    return device, bus


def test_latch_round_trips_partial_and_unaligned_accesses():
    device, bus = make_test_device({})
    bus.write(0xE0, (0x12345678).to_bytes(4, "little"))
    assert bus.read(0xE0, 4) == (0x12345678).to_bytes(4, "little")
    bus.write(0xE1, b"\xAA")
    assert bus.read(0xE0, 4) == (0x1234AA78).to_bytes(4, "little")
    assert bus.read(0xE2, 2) == b"\x34\x12"
    assert bus.read(0xE8, 4) == (0x1234AA78).to_bytes(4, "little")   # the byte window: the same latch
    bus.write(0xEA, b"\x01\x02")
    assert bus.read(0xE0, 4) == (0x0201AA78).to_bytes(4, "little")
    bus.write(0xE4, (0x1000).to_bytes(4, "little"))                  # flush page: ignored
    assert device.latch == 0x0201AA78


def test_irq_ports_drive_isa_lines_and_skip_unoffered_ones():
    lines = {5: Line(), 9: Line()}
    device, bus = make_test_device(lines)
    bus.write(0x2005, b"\x01")
    bus.write(0x2009, b"\x01")
    bus.write(0x2009, b"\x00")
    bus.write(0x2002, b"\x01")           # the cascade: no line
    assert lines[5].levels == [True] and lines[9].levels == [True, False]
    assert device.save().raised == (5,)


def test_test_device_state_restores_latch_and_raised_lines():
    lines = {5: Line()}
    device, bus = make_test_device(lines)
    bus.write(0xE0, b"\x42")
    bus.write(0x2005, b"\x01")
    state = through_json(device.save())
    fresh_lines = {5: Line()}
    other = TestDevice(fresh_lines)
    other.restore(state)
    assert other.latch == 0x42 and fresh_lines[5].levels == [True]
    with pytest.raises(StateError, match="raised"):
        TestDeviceState(latch=0, raised=(16,))


def test_machine_with_test_devices_lists_them_and_its_description_keeps_the_option():
    config = MachineConfig(kernel="k", test_devices=True)
    assert {"pc-testdev", "fw-cfg"} <= set(expected_device_ids(config))
    assert "fw-cfg" not in expected_device_ids(MachineConfig(kernel="k"))
    assert MachineDescription.from_config(config).to_config().test_devices
    old = through_json(MachineDescription.from_config(MachineConfig(kernel="k"))).to_dict()
    old["version"] = 5
    del old["fields"]["test_devices"]
    assert MachineDescription.from_dict(old).test_devices is False


def test_a_vm_with_test_devices_saves_and_restores_their_state(tmp_path):
    """Built with test_devices, the VM has both on its port bus; their state goes through a
    saved VmState (as another process reads it) into a new VM."""
    import json

    from pyvmm.accel.select import choose_accelerator
    from pyvmm.builder import build_vm
    from pyvmm.restore import carry_over, restore_vm
    from pyvmm.vm_state import VmState

    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")  # cli; hlt
    config = MachineConfig(kernel=str(kernel), flat_address=0x100000, memory=16 << 20, cpus=1, test_devices=True)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create())
    try:
        vm.pause()
        vm.pio_bus.write(0x510, (0x00).to_bytes(2, "little"))    # fw_cfg: the signature, one byte read
        assert vm.pio_bus.read(0x511, 1) == b"Q"
        vm.pio_bus.write(0xE0, (0xCAFE).to_bytes(4, "little"))
        state = VmState.from_dict(json.loads(json.dumps(vm.save().to_dict())))
        carried = carry_over(vm)
    finally:
        vm.close()
    assert state.machine.test_devices
    restored = restore_vm(state, carried.memory, lambda data: None, carryover=carried)
    try:
        assert restored.pio_bus.read(0x511, 3) == b"EMU"          # the same item, where it was
        assert restored.pio_bus.read(0xE0, 4) == (0xCAFE).to_bytes(4, "little")
        restored.pio_bus.write(0x510, (0x03).to_bytes(2, "little"))
        assert bytes(restored.pio_bus.read(0x511, 1)[0] for _ in range(4)) == (16 << 20).to_bytes(4, "little")
    finally:
        restored.close()
