"""The scheduler's hint that a vCPU is spinning: its turn ended next to a PAUSE.

With several vCPUs, such a vCPU gets a short turn next, so that the vCPU it waits for runs
sooner (accelerator.py). These guests loop forever; each turn is ended by the slice timer.
"""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

from pyvmm.accel.tcg.vcpu import TcgVcpu  # noqa: E402
from pyvmm.arch.x86_64.boot_tables import long_mode_state  # noqa: E402
from pyvmm.accel.exits import Interrupted  # noqa: E402

CODE = 0x10_0000
SPIN_WITH_PAUSE = bytes.fromhex("48ffc0" "f390" "ebf9")      # 1: inc %rax ; pause ; jmp 1b
BUSY_LOOP = bytes.fromhex("48ffc0" "48ffc3" "ebf8")          # 1: inc %rax ; inc %rbx ; jmp 1b


def _turn_ends_at_pause(translator, code: bytes) -> bool:
    memory = translator.memory
    memory.write(CODE, code)
    cpu = TcgVcpu(0, translator, cpuid_table=None)
    cpu.set_state(long_mode_state(memory, CODE))
    results = []
    for _ in range(5):
        assert isinstance(cpu.run(0.001), Interrupted)
        results.append(cpu.at_pause())
    cpu.close()
    assert len(set(results)) == 1, results  # the same answer wherever the loop was stopped
    return results[0]


def test_a_spin_loop_with_pause_is_recognised(translator):
    assert _turn_ends_at_pause(translator, SPIN_WITH_PAUSE)


def test_a_busy_loop_without_pause_is_not(translator):
    assert not _turn_ends_at_pause(translator, BUSY_LOOP)
