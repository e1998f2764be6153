"""pyvmm.hotplug on a VM of the software CPU whose guest does nothing (no KVM, no Linux): what a
plug and an unplug change in the device tree, the PCI root and the machine description, and
the one-line refusals (unknown or duplicate id, virtio-mmio, a fixed device, a guest that
does not eject in time), each leaving the VM as it was. The guest's side is the controller's
EJECTED register, written here as the guest's _EJ0 would."""

import time

import pytest

from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import PCI_HOTPLUG_ID, build_vm
from pyvmm.config import DiskConfig, MachineConfig, NetConfig
from pyvmm.devices.legacy.pci_hotplug import EJECTED, INSERTED, REMOVING
from pyvmm.hotplug import HotplugError, attach_disk, detach
from pyvmm.vm_state import capture


@pytest.fixture
def vm(tmp_path):
    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")  # cli; hlt
    config = MachineConfig(kernel=str(kernel), flat_address=0x100000, memory=16 << 20,
                           disks=(DiskConfig(image(tmp_path, "boot0.img")),
                                  DiskConfig(image(tmp_path, "boot1.img"), readonly=True, transport="mmio")))
    machine = build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create())
    yield machine
    machine.close()


def image(tmp_path, name="data.img"):
    path = tmp_path / name
    path.write_bytes(bytes(8192))
    return str(path)


def read32(device, offset):
    return int.from_bytes(device.read(offset, 4), "little")


def guest_ejects(vm, slot):
    vm.devices[PCI_HOTPLUG_ID].write(EJECTED, (1 << slot).to_bytes(4, "little"))


def test_a_plugged_disk_gets_a_slot_and_the_guest_is_told(vm, tmp_path):
    controller = vm.devices[PCI_HOTPLUG_ID]
    assert attach_disk(vm, DiskConfig(image(tmp_path), id="data")) == "data"
    node = vm.device_manager.tree.get("data")
    assert node.kind == "virtio-blk" and node.transport == "virtio-pci" and node.resources.pci_slot == 2
    assert vm.assembly.pci_root.device(2) is vm.device_manager.transport("data")
    assert read32(controller, INSERTED) == 1 << 2
    assert [d.id for d in vm.machine.disks] == [None, None, "data"]
    assert attach_disk(vm, DiskConfig(image(tmp_path, "b.img"))) == "virtio-blk2"   # the first free default id
    vm.pause()
    assert {"data", "virtio-blk2"} <= set(capture(vm).devices)   # a snapshot holds them
    vm.resume()


def test_an_unplug_waits_for_the_guests_eject_and_frees_the_slot(vm, tmp_path):
    attach_disk(vm, DiskConfig(image(tmp_path), id="data"))
    with pytest.raises(HotplugError, match=r"^the guest has not released data within 0.1 s .*stays attached"):
        detach(vm, "data", timeout=0.1)
    assert "data" in vm.device_manager.tree and read32(vm.devices[PCI_HOTPLUG_ID], REMOVING) == 1 << 2
    guest_ejects(vm, 2)                       # later: the request stood, the device leaves now
    deadline = time.monotonic() + 10
    while "data" in vm.device_manager.tree and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "data" not in vm.device_manager.tree and vm.assembly.pci_root.device(2) is None
    assert [d.id for d in vm.machine.disks] == ["virtio-blk0", "virtio-blk1"]   # the others keep their ids
    attach_disk(vm, DiskConfig(image(tmp_path), id="data"))                  # the slot is free again
    assert vm.device_manager.tree.get("data").resources.pci_slot == 2


def test_a_boot_disk_can_leave_too_and_force_does_not_wait(vm, tmp_path):
    detach(vm, "virtio-blk0", force=True)
    assert "virtio-blk0" not in vm.devices and vm.assembly.pci_root.device(1) is None
    assert [d.id for d in vm.machine.disks] == ["virtio-blk1"]


@pytest.mark.parametrize("call, message", [
    (lambda vm, img: attach_disk(vm, DiskConfig(img, id="com1")), r"^'com1': a device with that id exists already$"),
    (lambda vm, img: attach_disk(vm, DiskConfig(img, id="virtio-blk0")), r"^'virtio-blk0': a device with that id"),
    (lambda vm, img: attach_disk(vm, DiskConfig(img, transport="mmio")), r"^virtio-mmio devices are not hot-pluggable"),
    (lambda vm, img: attach_disk(vm, DiskConfig(img + ".missing")), r"disks\[2\]\.path"),
    (lambda vm, img: detach(vm, "nothing"), r"^'nothing': no such device$"),
    (lambda vm, img: detach(vm, "virtio-blk1"), r"^virtio-blk1: virtio-mmio devices are not hot-pluggable"),
    (lambda vm, img: detach(vm, "com1"), r"^com1 \(uart16550\) cannot be unplugged"),
    (lambda vm, img: detach(vm, PCI_HOTPLUG_ID), r"cannot be unplugged"),
])
def test_bad_requests_are_one_line_and_change_nothing(vm, tmp_path, call, message):
    before = ([node for node in vm.device_manager.tree], vm.machine, dict(vm.assembly.pci_root.devices))
    with pytest.raises(Exception) as error:
        call(vm, image(tmp_path))
    assert isinstance(error.value, Exception) and "\n" not in str(error.value)
    assert __import__("re").search(message, str(error.value)), str(error.value)
    assert ([node for node in vm.device_manager.tree], vm.machine, dict(vm.assembly.pci_root.devices)) == before


def test_a_nic_on_a_missing_tap_is_refused_in_one_line(vm):
    from pyvmm.hotplug import attach_net
    from pyvmm.errors import UserError

    with pytest.raises(UserError) as error:
        attach_net(vm, NetConfig(tap="pyvmm-no-such-tap-x"))
    assert "\n" not in str(error.value)
    assert "virtio-net0" not in vm.device_manager.tree


def test_the_entropy_and_vsock_devices_plug_in_once_each_and_leave(vm, tmp_path):
    from pyvmm.config import VsockConfig
    from pyvmm.hotplug import attach_rng, attach_vsock

    uds = str(tmp_path / "v.sock")
    assert attach_rng(vm) == "virtio-rng" and vm.machine.rng == "pci"
    assert attach_vsock(vm, VsockConfig(7, uds)) == "virtio-vsock" and vm.machine.vsock.cid == 7
    assert {vm.device_manager.tree.get(i).transport for i in ("virtio-rng", "virtio-vsock")} == {"virtio-pci"}
    assert __import__("os").path.exists(uds)         # the host side listens
    before = ([node for node in vm.device_manager.tree], vm.machine)
    for call, message in ((lambda: attach_rng(vm), r"^the VM has an entropy device \(virtio-rng\) already: one per VM$"),
                          (lambda: attach_vsock(vm, VsockConfig(8, uds + "2")), r"^the VM has a vsock device already"),
                          (lambda: attach_rng(vm, "mmio"), r"^virtio-mmio devices are not hot-pluggable")):
        with pytest.raises(HotplugError, match=message):
            call()
    assert ([node for node in vm.device_manager.tree], vm.machine) == before
    detach(vm, "virtio-rng", force=True)
    slot = vm.device_manager.tree.get("virtio-vsock").resources.pci_slot
    with pytest.raises(HotplugError, match="has not released virtio-vsock"):
        detach(vm, "virtio-vsock", timeout=0.1)
    guest_ejects(vm, slot)
    deadline = time.monotonic() + 10
    while "virtio-vsock" in vm.device_manager.tree and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vm.machine.rng is None and vm.machine.vsock is None
    assert not {"virtio-rng", "virtio-vsock"} & set(vm.devices)
    assert attach_rng(vm) == "virtio-rng"            # and again


def test_a_restored_vm_has_the_plugged_devices_and_can_unplug_them(vm, tmp_path):
    from pyvmm.config import VsockConfig
    from pyvmm.hotplug import attach_rng, attach_vsock
    from pyvmm.restore import carry_over
    from pyvmm.snapshot import load_snapshot, save_snapshot

    attach_disk(vm, DiskConfig(image(tmp_path), id="data"))
    attach_rng(vm)
    attach_vsock(vm, VsockConfig(9, str(tmp_path / "v.sock")))
    vm.pause()
    save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
    carried = carry_over(vm)
    vm.close()
    restored = load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem", lambda data: None, carryover=carried)
    try:
        restored.resume()
        assert {"data", "virtio-rng", "virtio-vsock"} <= set(restored.devices)
        assert restored.machine.rng == "pci" and restored.machine.vsock.cid == 9
        slot = restored.device_manager.tree.get("data").resources.pci_slot
        with pytest.raises(HotplugError, match="has not released data"):
            detach(restored, "data", timeout=0.1)
        guest_ejects(restored, slot)                 # the restored guest lets go: it leaves
        deadline = time.monotonic() + 10
        while "data" in restored.device_manager.tree and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "data" not in restored.device_manager.tree and [d.id for d in restored.machine.disks] == [
            "virtio-blk0", "virtio-blk1"]
        for device_id in ("virtio-rng", "virtio-vsock"):
            detach(restored, device_id, force=True)
        assert restored.machine.rng is None and restored.machine.vsock is None and not restored.stopped
    finally:
        restored.close()


def test_a_full_root_bus_refuses_in_one_line_and_the_vm_runs_on(vm, tmp_path):
    from pyvmm.hotplug import attach_rng

    img = image(tmp_path)
    free = sum(1 for slot in range(1, 32) if vm.assembly.pci_root.device(slot) is None)
    for n in range(free):
        attach_disk(vm, DiskConfig(img, id=f"d{n}", readonly=True))
    before = ([node for node in vm.device_manager.tree], vm.machine)
    for call in (lambda: attach_disk(vm, DiskConfig(img, id="one-more", readonly=True)), lambda: attach_rng(vm)):
        with pytest.raises(Exception, match=r"no free PCI slot") as error:
            call()
        assert "\n" not in str(error.value)
    assert ([node for node in vm.device_manager.tree], vm.machine) == before and not vm.stopped
