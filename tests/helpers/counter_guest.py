"""The counting tiny guest (tests/kvm/guests/roundtrip.S) for tests that take a VM apart and
put it back together (save/restore, snapshot files, clones, migration): it counts in memory
and through the UART's scratch register, checking both at every step, and ends with debug
exit 0 when the count reaches the limit the host wrote; a restart or a lost step fails."""

from __future__ import annotations

import time

from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.guests import build_source

from .reporting import KVM_GUESTS

COUNT, LIMIT, STARTS = 0x300000, 0x300008, 0x300010
STEPS = 20000
OK_STATUS, FAILED_STATUS = 1, 5       # debug exit 0 / 2


def counter_config(memory: int = 16 << 20) -> MachineConfig:
    return MachineConfig(kernel=str(build_source(KVM_GUESTS / "roundtrip.S", 64)), memory=memory)


def counting_vm(accel: str, memory: int = 16 << 20, config: MachineConfig | None = None):
    """A started VM whose guest has counted at least 500 steps."""
    vm = build_vm(config or counter_config(memory), lambda data: None, accel=choose_accelerator(accel).create())
    vm.memory.write_u64(LIMIT, STEPS)
    vm.start()
    deadline = time.monotonic() + 60
    while vm.memory.read_u64(COUNT) < 500 and not vm.stopped:
        assert time.monotonic() < deadline, "the guest never started counting"
        time.sleep(0.001)
    assert not vm.stopped, vm.outcome
    return vm


def finish(vm, paused_at: int) -> None:
    """A restored VM: paused until resumed, then the guest counts on from `paused_at` and exits
    normally, having started once."""
    assert vm.paused
    time.sleep(0.2)
    assert vm.memory.read_u64(COUNT) == paused_at, "the restored VM ran before resume()"
    vm.resume()
    deadline = time.monotonic() + 60
    while vm.memory.read_u64(COUNT) == paused_at and not vm.stopped:
        assert time.monotonic() < deadline, "the restored guest does not count on"
        time.sleep(0.001)
    outcome = vm.wait(120)
    assert outcome is not None, "the restored guest did not finish"
    assert (outcome.reason, outcome.status) == ("debug-exit", OK_STATUS), outcome.message
    assert vm.memory.read_u64(COUNT) == STEPS
    assert vm.memory.read_u64(STARTS) == 1          # went on, never restarted
