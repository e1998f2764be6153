"""Proof by round trip, on both accelerators: a running guest (guests/roundtrip.S: counts in
memory and through the UART's scratch register, checking both at every step) is paused, its
whole state saved and sent through JSON, the old VM closed with its memory kept, a fresh VM
built from the state and that memory, and resumed: the count goes on from where it stood,
the guest never restarts, its own checks pass and it ends with its normal exit.

Memory ownership: the old VM hands its guest memory over (carry_over -> release_memory)
before it is closed, so closing it stops its threads and releases its devices and
accelerator but leaves the memory to the restored VM, which owns it from then on."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import types

import pytest

from helpers.counter_guest import COUNT, STEPS, counter_config, counting_vm, finish
from helpers.reporting import KVM_GUESTS
from helpers.state import through_json
from pyvmm.accel.select import choose_accelerator
from pyvmm.arch.x86_64 import layout
from pyvmm.arch.x86_64 import msrs as M
from pyvmm.memory import GuestMemory
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.guests import build_source
from pyvmm.persist import StateError
from pyvmm.restore import carry_over, restore_vm
from pyvmm.vm import VmNotPaused
from pyvmm.vm_state import VmState

def _config() -> MachineConfig:
    return counter_config()


def _counting(accel: str):
    return counting_vm(accel)


def _paused_and_saved(accel: str):
    """A counting VM, paused mid-way and saved: (its state through JSON, the carryover, the count)."""
    vm = _counting(accel)
    try:
        vm.pause()
        paused_at = vm.memory.read_u64(COUNT)
        assert 0 < paused_at < STEPS
        state = vm.save()
        assert through_json(state) == state
        state = VmState.from_dict(json.loads(json.dumps(state.to_dict())))  # as another process reads it
        carried = carry_over(vm)
    finally:
        vm.close()
    assert carried.memory.read_u64(COUNT) == paused_at   # closing the old VM left memory alone
    return state, carried, paused_at


def _timeless(state: VmState) -> dict:
    """The state apart from what runs on while paused by the time policy (README): the TSC
    (KVM's on a host that takes no TSC value) and the RTC's host-UTC reading with the events
    it counts (a second boundary passed sets the update flag in register C)."""
    fields = state.to_dict()["fields"]
    for name in ("checked_ns", "flags"):
        fields["devices"]["rtc"]["fields"].pop(name)
    for vcpu in fields["vcpus"]:
        vcpu["fields"]["msrs"].pop(str(M.MSR_IA32_TSC), None)
    return fields


def _finish(vm, paused_at: int) -> None:
    finish(vm, paused_at)


def test_a_paused_vm_continues_in_a_fresh_vm_from_its_state(accel):
    state, carried, paused_at = _paused_and_saved(accel)
    assert state.accelerator == accel and len(state.vcpus) == 1
    assert "com1" in state.devices and state.guest_clock_ns > 0
    vm = restore_vm(state, carried.memory, lambda data: None, carryover=carried)
    try:
        assert _timeless(vm.save()) == _timeless(state)  # the restore loaded all of it
        _finish(vm, paused_at)
    finally:
        vm.close()


def test_the_restored_vm_saves_and_restores_again(accel):
    """Two round trips in a row: a restored VM is a VM like any other."""
    state, carried, paused_at = _paused_and_saved(accel)
    vm = restore_vm(state, carried.memory, lambda data: None, carryover=carried)
    try:
        vm.resume()
        deadline = time.monotonic() + 60
        while vm.memory.read_u64(COUNT) < paused_at + 200 and not vm.stopped:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        vm.pause()
        again_at = vm.memory.read_u64(COUNT)
        if again_at >= STEPS:
            pytest.fail("the guest finished before the second pause")
        second = through_json(vm.save())
        carried = carry_over(vm)
    finally:
        vm.close()
    vm = restore_vm(second, carried.memory, lambda data: None, carryover=carried)
    try:
        _finish(vm, again_at)
    finally:
        vm.close()


def test_save_needs_a_paused_vm(accel):
    vm = _counting(accel)
    try:
        with pytest.raises(VmNotPaused, match=r"^the VM must be paused to save its state \(pause\(\) first\)$"):
            vm.save()
    finally:
        vm.close()
    with pytest.raises(VmNotPaused, match="stopped"):
        vm.pause(), vm.save()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_state_that_does_not_fit_fails_with_one_line_and_builds_nothing(accel):
    state, carried, paused_at = _paused_and_saved(accel)
    data = state.to_dict()
    wrong_version = {**data, "version": 99}
    with pytest.raises(StateError, match=r"^vm state: version 99 is not supported \(this pyvmm reads 1\.\.2\)$"):
        VmState.from_dict(wrong_version)
    with pytest.raises(StateError, match=r"^vm state: vcpus: 1 saved, the machine has 2$"):
        dataclasses.replace(state, machine=dataclasses.replace(state.machine, cpus=2))
    without_rtc = dataclasses.replace(
        state, device_tree=dataclasses.replace(state.device_tree, nodes=tuple(
            n for n in state.device_tree.nodes if n.id != "rtc")),
        devices={k: v for k, v in state.devices.items() if k != "rtc"})
    other_accel = "tcg" if accel == "kvm" else "kvm"
    with pytest.raises(StateError, match=rf"^vm state: platform: a '[a-z_-]+' state, a {other_accel} VM saves a "):
        dataclasses.replace(state, accelerator=other_accel)
    small = GuestMemory.from_specs(layout.ram_regions(8 << 20))
    wrong = [
        (without_rtc, {}, r"^vm state: device_tree: 'rtc' is missing$"),
        (state, {"config": dataclasses.replace(_config(), cpus=2)},
         r"^vm state: machine\.cpus: the state's machine differs from this one's$"),
        (dataclasses.replace(state, guest_view=None), {"accel": types.SimpleNamespace(name=other_accel)},
         rf"^vm state: guest_view: the state does not record the CPU the guest saw \(an older pyvmm saved it\), "
         rf"so it can continue only on {accel}$"),
        (state, {"memory": small},
         r"^vm state: machine\.memory: 16 MiB of guest RAM, the memory given holds 8 MiB$"),
    ]
    threads, fds = threading.active_count(), _open_fds()
    for bad, kwargs, message in wrong:
        kwargs = {"memory": carried.memory, **kwargs}
        with pytest.raises(StateError, match=message) as error:
            restore_vm(bad, kwargs.pop("memory"), lambda data: None, carryover=carried, **kwargs)
        assert "\n" not in str(error.value)
        assert threading.active_count() == threads and _open_fds() == fds   # nothing left built
    small.close()
    # The memory is still the caller's, intact: the right state restores into it and goes on.
    assert carried.memory.read_u64(COUNT) == paused_at
    vm = restore_vm(state, carried.memory, lambda data: None, carryover=carried)
    try:
        _finish(vm, paused_at)
    finally:
        vm.close()


class _Signal:
    def __init__(self) -> None:
        self.seen = threading.Event()

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.seen.set()


def _state_in_syscall_handler(path: str, monkeypatch):
    """The syscall_entry guest's state in its SYSCALL handler, SYSCALL done by `path`: the
    engine's machine code (native_syscall.py) or the Python hook; and its carry-over."""
    monkeypatch.setenv("PYVMM_TCG_SYSCALLS", path)
    config = MachineConfig(kernel=str(build_source(KVM_GUESTS / "syscall_entry.S", 64)), memory=16 << 20)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create())
    signal = _Signal()
    vm.mmio_bus.register(0xD0003000, 4, signal, "syscall-signal")
    try:
        vm.start()
        assert signal.seen.wait(30), "the guest never reached its SYSCALL handler"
        vm.pause()
        vcpu = vm.vcpus[0]
        assert vcpu.stats["syscalls"] == 1, "the vCPU counts the SYSCALL either way"
        assert (vcpu.translator.native_syscalls is not None) == (path == "native")
        return vm.save(), carry_over(vm)
    finally:
        vm.close()


def test_software_cpu_syscall_in_machine_code_is_the_python_hooks():
    """The machine code's SYSCALL leaves the vCPU exactly as the Python hook's does."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        native, _ = _state_in_syscall_handler("native", monkeypatch)
        python, _ = _state_in_syscall_handler("python", monkeypatch)
    a, b = native.vcpus[0], python.vcpus[0]
    assert (a.gprs, a.rip, a.rflags, a.segments) == (b.gprs, b.rip, b.rflags, b.segments)
    assert a.gprs["rcx"] and a.gprs["r11"] & ~0x10000 == 0x2, "RCX: the user's next instruction; R11: its RFLAGS"


def test_software_cpu_syscall_loads_the_kernel_segments_a_state_saves(monkeypatch):
    """SYSCALL from CPL 3 on the software CPU: the saved CS and SS are the kernel's, DPL 0
    (a state takes the CPL from SS.DPL; the user's DPL 3 left in SS made a restored Linux
    guest run its kernel at CPL 3), and they come through a VM-level round trip."""
    state, carried = _state_in_syscall_handler("native", monkeypatch)
    cs, ss = state.vcpus[0].segments["cs"], state.vcpus[0].segments["ss"]
    assert (cs.selector, cs.dpl, cs.l, cs.type, cs.base) == (0x08, 0, 1, 0xB, 0)
    assert (ss.selector, ss.dpl, ss.db, ss.type, ss.base, ss.limit) == (0x10, 0, 1, 0x3, 0, 0xFFFFFFFF)
    vm = restore_vm(through_json(state), carried.memory, lambda data: None, carryover=carried)
    try:
        restored = vm.save().vcpus[0].segments
        assert (restored["cs"], restored["ss"]) == (cs, ss)
    finally:
        vm.close()
