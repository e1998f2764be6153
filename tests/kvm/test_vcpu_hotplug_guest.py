"""CPU hotplug on both accelerators, seen by a guest (guests/cpuplug.S) that drives the CPU
hotplug controller itself: a vCPU plugged in answers the guest's INIT and SIPI and runs its
code; unplugged (the guest ejects it while it still runs), it runs no more while the rest of
the VM goes on; plugged in again, the guest starts it again. On KVM, which cannot destroy a
vCPU, the unplugged vCPU's thread parks and the same vCPU comes back."""

from __future__ import annotations

import threading
import time

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.guests import build_source
from pyvmm.hotplug import HotplugError, set_vcpus

AP_COUNT, STARTS, BSP_COUNT, AP_APIC_ID = 0x300000, 0x300004, 0x300008, 0x30000C


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def plug_vm(accel):
    console = bytearray()
    config = MachineConfig(kernel=str(build_source(KVM_GUESTS / "cpuplug.S", 32)), memory=16 << 20, cpus=1, max_cpus=2)
    vm = build_vm(config, console.extend, accel=choose_accelerator(accel).create())
    vm.start()
    try:
        _wait_for(lambda: b"cpuplug: up" in console, "the guest to start")
        yield vm, console
    finally:
        vm.close()


def test_a_plugged_vcpu_runs_an_unplugged_one_stops_and_comes_back(plug_vm, accel):
    vm, console = plug_vm
    read = vm.memory.read_u32
    set_vcpus(vm, 2)
    _wait_for(lambda: read(STARTS) == 1 and read(AP_COUNT) > 10, "vCPU 1 to start and count")
    assert read(AP_APIC_ID) == 1 and len(vm.vcpus) == 2
    first = vm.vcpus[1]

    set_vcpus(vm, 1, timeout=60)
    assert len(vm.vcpus) == 1 and vm.machine.cpus == 1
    # (console output reaches the host in batches, up to 2 ms after the guest wrote it)
    _wait_for(lambda: b"cpuplug: eject" in console, "the guest's eject line")
    stopped_at, polls = read(AP_COUNT), read(BSP_COUNT)
    _wait_for(lambda: read(BSP_COUNT) > polls + 20, "the boot CPU to go on")
    assert read(AP_COUNT) == stopped_at, "the unplugged vCPU still runs"
    # The VM is whole: it pauses (the parked vCPU is not waited for) and saves its one vCPU.
    vm.pause()
    try:
        assert len(vm.save().vcpus) == 1
    finally:
        vm.resume()
    assert not vm.stopped
    if accel == "kvm":
        assert [t for t in threading.enumerate() if t.name == "vcpu1"], "the parked thread is kept"

    set_vcpus(vm, 2)
    _wait_for(lambda: read(STARTS) == 2 and read(AP_COUNT) > stopped_at + 10, "vCPU 1 to start again")
    _wait_for(lambda: console.count(b"cpuplug: plug") == 2, "the guest's second plug line")
    assert read(AP_APIC_ID) == 1
    if accel == "kvm":
        assert vm.vcpus[1] is first, "KVM's vCPU 1 came back, not a new one"
    assert len([t for t in threading.enumerate() if t.name == "vcpu1"]) == (1 if accel == "kvm" else 0)
    assert not vm.stopped


def test_removing_the_boot_cpu_or_going_beyond_the_maximum_is_refused(plug_vm):
    vm, _ = plug_vm
    for count, says in ((0, "the boot CPU cannot be removed"), (3, "1 to 2")):
        with pytest.raises(HotplugError, match=says):
            set_vcpus(vm, count)
    assert len(vm.vcpus) == 1 and not vm.stopped
    polls = vm.memory.read_u32(BSP_COUNT)
    _wait_for(lambda: vm.memory.read_u32(BSP_COUNT) > polls, "the guest to go on")


def test_a_vm_restored_after_an_unplug_plugs_the_vcpu_in_again(plug_vm, accel, tmp_path):
    from pyvmm.restore import carry_over
    from pyvmm.snapshot import load_snapshot, save_snapshot

    vm, console = plug_vm
    set_vcpus(vm, 2)
    _wait_for(lambda: vm.memory.read_u32(STARTS) == 1, "vCPU 1 to start")
    set_vcpus(vm, 1, timeout=60)
    vm.pause()
    save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
    carried = carry_over(vm)
    vm.close()
    restored = load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem", console.extend,
                             accel=choose_accelerator(accel).create(), carryover=carried)
    try:
        assert len(restored.vcpus) == 1 and restored.machine.possible_cpus == 2
        restored.resume()
        stopped_at = restored.memory.read_u32(AP_COUNT)
        set_vcpus(restored, 2)
        _wait_for(lambda: restored.memory.read_u32(STARTS) == 2 and restored.memory.read_u32(AP_COUNT) > stopped_at,
                  "vCPU 1 to start in the restored VM")
        set_vcpus(restored, 1, timeout=60)
        assert len(restored.vcpus) == 1 and not restored.stopped
    finally:
        restored.close()


def test_setvcpus_through_the_api_on_both_accelerators(accel, tmp_path):
    from pyvmm.accel.kvm.accelerator import install_kick_handler
    from pyvmm.api.instance import VmInstance
    from pyvmm.api.schema import VmSpec
    from pyvmm.api.server import ApiServer
    from pyvmm.manage.client import ApiClient, ApiError

    install_kick_handler()   # requests run on the server's threads (a VM process installs it first too)
    instance = VmInstance("plug", VmSpec(pyvmm={"accel": accel, "max_vcpus": 2}))
    server = ApiServer(instance, str(tmp_path / "api.sock")).start()
    api = ApiClient(str(tmp_path / "api.sock"), timeout=120)
    try:
        api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
        api.put("/boot-source", {"kernel_image_path": str(build_source(KVM_GUESTS / "cpuplug.S", 32))})
        api.put("/actions", {"action_type": "InstanceStart"})
        vm = instance.vm
        _wait_for(lambda: vm.memory.read_u32(BSP_COUNT) > 0, "the guest to start")
        api.put("/pyvmm/vcpus", {"count": 2})
        _wait_for(lambda: vm.memory.read_u32(STARTS) == 1, "vCPU 1 to start")
        assert api.get("/pyvmm/vcpus") == {"count": 2, "max": 2}
        assert api.get("/vm/config")["machine-config"]["vcpu_count"] == 2
        for count in (0, 3):       # the boot CPU, beyond the maximum: a 400 in one line, the VM runs on
            with pytest.raises(ApiError) as error:
                api.put("/pyvmm/vcpus", {"count": count})
            assert error.value.status == 400 and "\n" not in error.value.fault_message
        api.put("/pyvmm/vcpus", {"count": 1, "timeout": 60})    # the guest ejects it
        assert api.get("/pyvmm/vcpus") == {"count": 1, "max": 2}
        assert api.get("/vm/config")["machine-config"]["vcpu_count"] == 1
        polls = vm.memory.read_u32(BSP_COUNT)
        _wait_for(lambda: vm.memory.read_u32(BSP_COUNT) > polls + 5, "the boot CPU to go on")
        assert not vm.stopped
    finally:
        if instance.vm is not None and not instance.vm.stopped:
            instance.stop(wait=30)
        server.close()
