"""build_vm records every device in the device manager's tree, and a VM built from a saved tree
gets the same resources (on the software CPU: no KVM needed)."""

import json

import pytest

from pyvmm.accel.select import choose_accelerator
from pyvmm.arch.x86_64 import layout
from pyvmm.builder import build_vm
from pyvmm.config import ConfigError, DiskConfig, MachineConfig
from pyvmm.devmgr import AllocationError, DeviceTree
from pyvmm.outcome_sink import OutcomeSink
from pyvmm.vm import EXIT_OK, VmOutcome


@pytest.fixture
def flat_kernel(tmp_path):
    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")  # cli; hlt
    return str(kernel)


def build(config, tree=None):
    return build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create(), device_tree=tree)


def machine(flat_kernel, tmp_path, transports=("pci", "mmio", "pci")):
    disks = []
    for i, transport in enumerate(transports):
        image = tmp_path / f"d{i}.img"
        image.write_bytes(bytes(4096))
        disks.append(DiskConfig(str(image), transport=transport))
    return MachineConfig(kernel=flat_kernel, flat_address=0x100000, memory=16 << 20, disks=tuple(disks), rng="mmio")


def test_every_device_is_a_node_with_its_resources(flat_kernel, tmp_path):
    vm = build(machine(flat_kernel, tmp_path))
    try:
        tree = vm.device_manager.tree
        nodes = {node.id: node for node in tree}
        assert {"com1", "i8042", "debug-exit", "post", "acpi-power", "guest-notify", "pvpanic", "ged", "pci-hotplug", "rtc", "pci",
                "virtio-blk0", "virtio-blk1", "virtio-blk2", "virtio-rng"} == set(nodes)
        assert nodes["com1"].resources.ports == ((layout.COM1_PORT, 8),) and nodes["com1"].resources.gsis == (4,)
        assert nodes["ged"].resources.ports == ((layout.GED_PORT, 4),) and nodes["ged"].resources.gsis == (layout.GED_GSI,)
        assert [nodes[f"virtio-blk{i}"].transport for i in range(3)] == ["virtio-pci", "virtio-mmio", "virtio-pci"]
        assert nodes["virtio-blk0"].parent == "pci" and nodes["virtio-blk0"].resources.pci_slot == 1
        assert nodes["virtio-blk2"].resources.pci_slot == 2
        assert nodes["virtio-blk1"].resources.mmio == ((layout.VIRTIO_MMIO_BASE, 0x200),)
        assert nodes["virtio-rng"].resources.mmio_slot == 1
        # the live objects: what the buses dispatch to is what the tree holds
        assert vm.devices["virtio-blk1"] is vm.device_manager.device("virtio-blk1")
        assert vm.mmio_bus.find(layout.VIRTIO_MMIO_BASE).device is vm.device_manager.transport("virtio-blk1")
        assert vm.pio_bus.find(layout.COM1_PORT).device is vm.devices["com1"]
        assert vm.device_manager.device("pci").device(2) is vm.device_manager.transport("virtio-blk2")
    finally:
        vm.close()


def test_a_vm_built_from_a_saved_tree_gets_the_same_resources(flat_kernel, tmp_path):
    config = machine(flat_kernel, tmp_path)
    vm = build(config)
    saved = json.loads(json.dumps(vm.device_manager.tree.to_dict()))
    vm.close()
    rebuilt = build(config, DeviceTree.from_dict(saved))
    try:
        assert rebuilt.device_manager.tree.to_dict() == saved
    finally:
        rebuilt.close()


def test_a_saved_tree_that_does_not_match_the_machine_is_refused(flat_kernel, tmp_path):
    vm = build(machine(flat_kernel, tmp_path))
    tree = vm.device_manager.tree
    vm.close()
    with pytest.raises(ConfigError, match="lacks \\(virtio-blk2\\)"):
        build(machine(flat_kernel, tmp_path, ("pci", "mmio")), tree)
    with pytest.raises(AllocationError, match="virtio-blk1: the recorded device has transport 'virtio-mmio'"):
        build(machine(flat_kernel, tmp_path, ("pci", "pci", "pci")), tree)


def test_the_outcome_sink_delivers_early_and_late_stops_first_one_first():
    sink, seen = OutcomeSink(), []
    early, late = VmOutcome("panic", 4, "early"), VmOutcome("poweroff", EXIT_OK, "late")
    sink.stop(early)
    sink.stop(VmOutcome("reset", EXIT_OK, "also early: the first one wins"))
    sink.connect(seen.append)
    sink.stop(late)
    assert seen == [early, late]
    with pytest.raises(RuntimeError):
        sink.connect(seen.append)
