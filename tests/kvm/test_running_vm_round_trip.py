"""A running VM paused, its vCPU and machine state saved, a fresh VM built with the same
guest memory and those states, and resumed there: the guest goes on from where it was.

The guest counts in a register (EAX) and stores the count to memory, checking each time that
the register is one ahead of memory: a vCPU that lost its registers (or started again at
the entry point) writes its count to BROKEN and stops."""

from __future__ import annotations

import time

from helpers.state import through_json
from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig

LOAD = 0x100000
COUNTER, BROKEN = 0x300000, 0x300004
COUNT_IN_EAX = bytes.fromhex(  # 32-bit protected mode
    "40"            # 0:  inc %eax
    "8b1d00003000"  # 1:  mov COUNTER, %ebx
    "43"            # 7:  inc %ebx
    "39d8"          # 8:  cmp %ebx, %eax
    "7507"          # 10: jne broken
    "a300003000"    # 12: mov %eax, COUNTER
    "ebed"          # 17: jmp 0
    "a304003000"    # 19: broken: mov %eax, BROKEN
    "ebfe"          # 24: jmp .
)


def _vm(tmp_path, accel: str):
    image = tmp_path / "count.bin"
    image.write_bytes(COUNT_IN_EAX)
    config = MachineConfig(kernel=str(image), flat_address=LOAD, memory=16 << 20)
    return build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())


def _wait_for_count_above(vm, count: int) -> int:
    deadline = time.monotonic() + 30
    while (now := vm.memory.read_u32(COUNTER)) <= count:
        assert time.monotonic() < deadline, f"the guest's count stayed at {now}"
        time.sleep(0.01)
    return now


def _machine_state(vm):
    """The VM-wide state the accelerator keeps: KVM's in-kernel chips and clock, or the
    software CPU's platform."""
    return vm.accel.save() if vm.accel.name == "kvm" else vm.accel.platform.save()


def _restore_machine_state(vm, state) -> None:
    (vm.accel if vm.accel.name == "kvm" else vm.accel.platform).restore(state)


def test_a_paused_vm_goes_on_in_a_fresh_vm(tmp_path, accel):
    vm = _vm(tmp_path, accel)
    try:
        vm.start()
        _wait_for_count_above(vm, 1000)
        assert vm.memory.read_u32(BROKEN) == 0
        vm.pause()
        paused_count = vm.memory.read_u32(COUNTER)
        vcpu_state = through_json(vm.vcpus[0].save())
        machine_state = through_json(_machine_state(vm))
        fresh = _vm(tmp_path, accel)
        for region in vm.memory.regions:
            fresh.memory.write(region.guest_base, vm.memory.read(region.guest_base, region.size))
    finally:
        vm.close()
    try:
        assert vcpu_state.gprs["rax"] & 0xFFFFFFFF in (paused_count, paused_count + 1)  # stored, or about to be
        assert vcpu_state.segments["cs"].db == 1 and vcpu_state.cr0 & 1  # 32-bit protected mode
        _restore_machine_state(fresh, machine_state)
        fresh.vcpus[0].restore(vcpu_state)
        fresh.start()
        seen = [fresh.memory.read_u32(COUNTER)]
        for _ in range(3):
            seen.append(_wait_for_count_above(fresh, seen[-1]))
        fresh.pause()
        assert paused_count <= seen[0] and seen == sorted(seen)  # on from the saved count
        assert fresh.memory.read_u32(BROKEN) == 0  # EAX came along: never out of step with memory
        assert fresh.outcome is None
    finally:
        fresh.close()
