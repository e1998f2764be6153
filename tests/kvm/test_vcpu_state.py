"""Complete vCPU state: a guest (guests/vcpustate.S) sets distinctive register, x87, SSE,
debug-register and MSR state and stops at a checkpoint; the test saves the vCPU (and on KVM
the VM-wide in-kernel state), restores it into a FRESH VM with a copy of guest memory, and
lets the guest go on there: the state reads back identical and every check the guest makes
after the checkpoint passes."""

from __future__ import annotations

import json
import time

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.accel.select import choose_accelerator
from pyvmm.arch.x86_64 import msrs as M
from pyvmm.arch.x86_64.cpu_state import VcpuState
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.guests import build_source
from pyvmm.kvm import uapi
from pyvmm.kvm.vcpu import RUN_INTERRUPTED

SIGNALS = 0xD0002000  # failed check, checkpoint, done, TSC values: 32-bit MMIO writes


class Signals:
    """The guest's MMIO signals; the checkpoint and done signals end the slice (software CPU)."""

    def __init__(self, vcpu) -> None:
        self.vcpu = vcpu
        self.failed: list[int] = []
        self.tsc: list[int] = []
        self.checkpoints: list[int] = []
        self.done = False

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if offset == 0:
            self.failed.append(value)
        elif offset == 12:
            self.tsc.append(value)
        else:
            if offset == 4:
                self.checkpoints.append(value)
            else:
                self.done = True
            self.vcpu.kick()


def _vm(accel: str):
    config = MachineConfig(kernel=str(build_source(KVM_GUESTS / "vcpustate.S", 64)), memory=16 << 20)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    signals = Signals(vm.vcpus[0])
    vm.mmio_bus.register(SIGNALS, 16, signals, "vcpustate-signals")
    return vm, signals


def _run_until(vm, signals: Signals, checkpoint: int | None, limit: float = 60) -> None:
    """Run vCPU 0 on this thread until the guest signals `checkpoint` (None: done). The guest
    only writes MMIO: on KVM each write is one exit, on the software CPU a bus write."""
    vcpu = vm.vcpus[0]
    deadline = time.monotonic() + limit
    while not (signals.done if checkpoint is None else checkpoint in signals.checkpoints):
        assert time.monotonic() < deadline, f"the guest did not reach checkpoint {checkpoint}"
        if vm.accel.name == "tcg":
            exit_ = vcpu.run(0.05)
            vcpu.clear_kick()
            assert type(exit_).__name__ in ("Interrupted", "Hlt"), f"{exit_}: {vcpu.describe_position()}"
            continue
        reason = vcpu.fd.run()
        vcpu.clear_kick()
        mmio = vcpu.fd.run_struct.exit.mmio
        if reason == uapi.KVM_EXIT_MMIO and mmio.is_write:
            vm.mmio_bus.write(mmio.phys_addr, bytes(mmio.data)[:mmio.len])
        elif reason != RUN_INTERRUPTED:
            raise AssertionError(f"unexpected KVM exit {reason}: {vcpu.describe_position()}")


def _copy_memory(source, target) -> None:
    for region in source.memory.regions:
        target.memory.write(region.guest_base, source.memory.read(region.guest_base, region.size))


def _json_round_trip(state):
    return type(state).from_dict(json.loads(json.dumps(state.to_dict())))


def _without_tsc(state: VcpuState) -> dict:
    fields = state.to_dict()["fields"]
    fields["msrs"] = {k: v for k, v in fields["msrs"].items() if int(k) != M.MSR_IA32_TSC}
    return fields


@pytest.fixture
def kvm_only(accel):
    if accel != "kvm":
        pytest.skip("the software CPU's round trip is tested in test_tcg_vcpu_state")
    return accel


def test_saved_vcpu_state_holds_what_the_guest_set(kvm_only):
    vm, signals = _vm("kvm")
    try:
        _run_until(vm, signals, 1)
        kernel = vm.vcpus[0].save()
        _run_until(vm, signals, 2)
        user = vm.vcpus[0].save()
    finally:
        vm.close()
    assert signals.failed == []
    gprs = kernel.gprs
    assert (gprs["r8"], gprs["r15"], gprs["rbx"], gprs["rbp"]) == (
        0x0808080808080808, 0x1515151515151515, 0xB0B0B0B0B0B0B0B0, 0xBEBEBEBEBEBEBEBE)
    msrs = kernel.msrs
    assert msrs[M.MSR_LSTAR] == 0xFFFFFFFF89ABCDEF and msrs[M.MSR_KERNEL_GS_BASE] == 0xFFFF888012345000
    assert msrs[M.MSR_CSTAR] == 0xFFFFFFFFCAFE0000 and msrs[M.MSR_STAR] == 0x00100008CAFE1234
    assert msrs[M.MSR_IA32_CR_PAT] == 0x0007010600070106 and msrs[M.MSR_IA32_SYSENTER_EIP] == 0x8000
    assert msrs[M.MSR_SYSCALL_MASK] == 0x47700 and M.MSR_IA32_TSC in msrs
    assert kernel.segments["fs"].base == 0x5000 and kernel.segments["gs"].base == 0x6000
    assert kernel.dr == (0x1000, 0x2000, 0x3000, 0x4000) and kernel.dr7 & 0xFFFF0FFF == 0x000D0400
    assert kernel.cr8 == 5 and kernel.segments["cs"].selector == 0x08 and kernel.gdt.limit == 39
    assert user.fpu.fcw == 0x027F and user.fpu.mxcsr == 0x7F80
    assert user.fpu.st[0] == bytes.fromhex("0000000000000080ff3f")  # 1.0 as an 80-bit value
    assert user.fpu.xmm[0] == bytes.fromhex("efcdab89674523011032547698badcfe")
    assert user.fpu.xmm[7] == (0x1111222233334444).to_bytes(8, "little") + (0x5555666677778888).to_bytes(8, "little")
    assert user.mp_state == "runnable" and user.lapic is not None
    cs, ss = user.segments["cs"], user.segments["ss"]
    assert (cs.selector, cs.dpl, cs.l, ss.selector, ss.dpl) == (0x23, 3, 1, 0x1B, 3)
    assert _json_round_trip(user) == user and _json_round_trip(kernel) == kernel


def _kvm_round_trip(vm, signals):
    """Save `vm` (vCPU and VM-wide state), restore into a fresh VM with a copy of its memory."""
    vcpu_state = _json_round_trip(vm.vcpus[0].save())
    vm_state = _json_round_trip(vm.accel.save())
    fresh, fresh_signals = _vm("kvm")
    try:
        _copy_memory(vm, fresh)
        time.sleep(0.2)  # time spent saved
        fresh.accel.restore(vm_state)
        fresh.vcpus[0].restore(vcpu_state)
        again = fresh.vcpus[0].save()
        assert _without_tsc(again) == _without_tsc(vcpu_state)
        assert fresh.accel.save().ioapic == vm_state.ioapic
    except BaseException:
        fresh.close()
        raise
    fresh_signals.checkpoints = list(signals.checkpoints)
    return fresh, fresh_signals, vcpu_state


def test_kvm_state_restores_into_a_fresh_vm_and_the_guest_continues(kvm_only):
    """Two round trips: at CPL0 (MSRs, debug registers) and at CPL3 (x87, SSE)."""
    vm, signals = _vm("kvm")
    states = []
    try:
        for checkpoint in (1, 2):
            _run_until(vm, signals, checkpoint)
            failed = signals.failed
            previous = vm
            vm, signals, state = _kvm_round_trip(vm, signals)
            previous.close()
            signals.failed = failed
            states.append(state)
        _run_until(vm, signals, None)
    finally:
        vm.close()
    assert signals.failed == []
    before, after = signals.tsc[0] | signals.tsc[1] << 32, signals.tsc[2] | signals.tsc[3] << 32
    saved_tsc = states[1].msrs[M.MSR_IA32_TSC]
    assert before <= saved_tsc <= after      # the TSC went on from where it was saved, never back
