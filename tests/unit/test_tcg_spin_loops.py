"""A spin loop's PAUSE ends a vCPU's turn while another vCPU could run (spin_loops.py): the
scheduler hooks a PAUSE a turn ended next to; later turns end there after PAUSES_PER_SLICE
turns of the loop when armed for it, and only count when nobody else could run."""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.exits import Interrupted  # noqa: E402
from pyvmm.accel.tcg.spin_loops import PAUSES_PER_SLICE  # noqa: E402
from pyvmm.accel.tcg.vcpu import TcgVcpu  # noqa: E402
from pyvmm.arch.x86_64.boot_tables import long_mode_state  # noqa: E402

CODE = 0x10_0000
SPIN_WITH_PAUSE = bytes.fromhex("48ffc0" "f390" "ebf9")      # 1: inc %rax ; pause ; jmp 1b
PAUSE_AT = CODE + 3
BUSY_LOOP = bytes.fromhex("48ffc0" "48ffc3" "ebf8")          # 1: inc %rax ; inc %rbx ; jmp 1b
LONG_TURN = 20.0  # seconds: far longer than the test, which a PAUSE must end first


def _vcpu(translator, code: bytes) -> TcgVcpu:
    translator.memory.write(CODE, code)
    cpu = TcgVcpu(0, translator, cpuid_table=None)
    cpu.set_state(long_mode_state(translator.memory, CODE))
    translator.spin_loops.lowest_address = 0  # the test's code sits in the low half
    return cpu


def test_a_learned_pause_ends_turns_only_while_another_vcpu_could_run(translator):
    spin = translator.spin_loops
    cpu = _vcpu(translator, SPIN_WITH_PAUSE)
    spin.arm(True)
    assert isinstance(cpu.run(0.01), Interrupted)  # nothing hooked yet: the slice timer ends it
    assert spin.slice_ends == 0
    assert spin.learn(cpu) and spin.hooked == {PAUSE_AT}
    assert not spin.learn(cpu)  # once per PAUSE

    spin.arm(True)
    before = cpu.regs.read(X.UC_X86_REG_RAX)
    assert isinstance(cpu.run(LONG_TURN), Interrupted)
    assert spin.slice_ends == 1
    assert cpu.rip in (PAUSE_AT, PAUSE_AT + 2)  # at the PAUSE or right after it (the block start it ends)
    assert 0 < cpu.regs.read(X.UC_X86_REG_RAX) - before <= PAUSES_PER_SLICE

    spin.arm(False)  # nobody else to run: the PAUSE only counts, the slice timer ends the turn
    before = cpu.regs.read(X.UC_X86_REG_RAX)
    assert isinstance(cpu.run(0.05), Interrupted)
    assert spin.slice_ends == 1 and cpu.regs.read(X.UC_X86_REG_RAX) - before > PAUSES_PER_SLICE
    cpu.close()


def test_a_loop_without_pause_is_not_hooked(translator):
    cpu = _vcpu(translator, BUSY_LOOP)
    assert isinstance(cpu.run(0.01), Interrupted)
    assert not translator.spin_loops.learn(cpu) and not translator.spin_loops.hooked
    cpu.close()


def test_user_half_pauses_are_left_alone_by_default(translator):
    cpu = _vcpu(translator, SPIN_WITH_PAUSE)
    translator.spin_loops.lowest_address = 1 << 63  # the default: kernel code only
    assert isinstance(cpu.run(0.01), Interrupted)
    assert not translator.spin_loops.learn(cpu)
    cpu.close()


class _FakeVcpu:
    def __init__(self, rip: int) -> None:
        self.linear_rip, self.walks = rip, 0

    def at_pause(self) -> bool:
        self.walks += 1
        return True


def test_at_pause_answers_are_remembered_for_kernel_code_only(translator):
    spin = translator.spin_loops
    kernel, user = _FakeVcpu(0xFFFF_FFFF_8100_0000), _FakeVcpu(0x40_1000)
    assert all(spin.at_pause(kernel) for _ in range(3)) and kernel.walks == 1
    assert all(spin.at_pause(user) for _ in range(3)) and user.walks == 3
