"""A REP STOS interrupted by the end of a slice is finished by pyvmm in one go (string_assist.py).

The result must be exactly the architectural one: every element stored, RCX = 0, RDI past the
end, RIP after the instruction; or, where pyvmm stops early (memory that is not RAM), a state
from which the CPU can go on: RCX and RDI consistent, RIP still on the instruction.
"""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg.string_assist import finish_rep_stos  # noqa: E402
from pyvmm.accel.tcg.vcpu import TcgVcpu  # noqa: E402
from pyvmm.arch.x86_64.boot_tables import long_mode_state  # noqa: E402
from pyvmm.accel.exits import Hlt, Interrupted  # noqa: E402

CODE = 0x10_0000
BUFFER, BUFFER_SIZE = 0x20_0000, 0x40_0000  # 4 MiB: several slices' worth of REP STOSB
REP_STOSB, REP_STOSQ, HLT = b"\xf3\xaa", b"\xf3\x48\xab", b"\xf4"
RFLAGS_FIXED, RFLAGS_DF = 1 << 1, 1 << 10
RAM_END = 8 << 20  # the translator fixture's RAM


def _vcpu(translator, code: bytes, **registers) -> TcgVcpu:
    translator.memory.write(CODE, code)
    cpu = TcgVcpu(0, translator, cpuid_table=None)
    cpu.set_state(long_mode_state(translator.memory, CODE))
    for name, value in registers.items():
        cpu.regs.write(getattr(X, f"UC_X86_REG_{name.upper()}"), value)
    return cpu


def _run_to_hlt(cpu: TcgVcpu) -> None:
    for _ in range(10_000):
        exit_ = cpu.run(0.002)
        if isinstance(exit_, Hlt):
            return
        assert isinstance(exit_, Interrupted), exit_
    raise AssertionError("the guest never reached its HLT")


def test_a_long_rep_stosb_fills_the_buffer_exactly(translator):
    memory = translator.memory
    memory.fill(BUFFER - 0x1000, BUFFER_SIZE + 0x2000, 0x11)
    cpu = _vcpu(translator, REP_STOSB + HLT, rax=0xAB, rcx=BUFFER_SIZE, rdi=BUFFER)
    _run_to_hlt(cpu)
    assert cpu.stats["string_assists"] >= 1  # the slice timer did stop it midway
    assert memory.read(BUFFER, BUFFER_SIZE) == b"\xab" * BUFFER_SIZE
    assert memory.read(BUFFER - 0x1000, 0x1000) == b"\x11" * 0x1000  # neither before ...
    assert memory.read(BUFFER + BUFFER_SIZE, 0x1000) == b"\x11" * 0x1000  # ... nor after
    assert cpu.regs.read(X.UC_X86_REG_RCX) == 0
    assert cpu.regs.read(X.UC_X86_REG_RDI) == BUFFER + BUFFER_SIZE
    assert cpu.regs.read(X.UC_X86_REG_RIP) == CODE + len(REP_STOSB + HLT)
    cpu.close()


def test_rep_stosq_stores_the_whole_rax(translator):
    memory = translator.memory
    cpu = _vcpu(translator, REP_STOSQ + HLT, rax=0x0123456789ABCDEF, rcx=3, rdi=BUFFER)
    assert finish_rep_stos(cpu) == 24
    assert memory.read(BUFFER, 24) == (0x0123456789ABCDEF).to_bytes(8, "little") * 3
    assert cpu.regs.read(X.UC_X86_REG_RIP) == CODE + len(REP_STOSQ)
    cpu.close()


def test_it_stops_where_ram_ends_and_leaves_the_rest_to_the_cpu(translator):
    start = RAM_END - 0x3000
    cpu = _vcpu(translator, REP_STOSB + HLT, rax=0x5A, rcx=0x5000, rdi=start)
    assert finish_rep_stos(cpu) == 0x3000
    assert translator.memory.read(start, 0x3000) == b"\x5a" * 0x3000
    assert cpu.regs.read(X.UC_X86_REG_RCX) == 0x2000
    assert cpu.regs.read(X.UC_X86_REG_RDI) == RAM_END
    assert cpu.regs.read(X.UC_X86_REG_RIP) == CODE  # still on the instruction
    cpu.close()


def test_a_descending_stos_is_left_to_the_cpu(translator):
    cpu = _vcpu(translator, REP_STOSB + HLT, rax=0x5A, rcx=0x100, rdi=BUFFER, rflags=RFLAGS_FIXED | RFLAGS_DF)
    assert finish_rep_stos(cpu) == 0
    assert cpu.regs.read(X.UC_X86_REG_RCX) == 0x100 and cpu.regs.read(X.UC_X86_REG_RIP) == CODE
    cpu.close()


def test_code_it_overwrites_is_translated_again(translator):
    target = BUFFER
    translator.memory.write(target, bytes.fromhex("b801000000") + HLT)  # mov $1,%eax ; hlt
    cpu = _vcpu(translator, REP_STOSB + HLT)
    cpu.regs.write(X.UC_X86_REG_RIP, target)
    _run_to_hlt(cpu)  # translated and run once
    assert cpu.regs.read(X.UC_X86_REG_RAX) == 1
    # overwrite the MOV with five NOPs, from the REP STOSB at CODE
    for name, value in (("rip", CODE), ("rax", 0x90), ("rcx", 5), ("rdi", target)):
        cpu.regs.write(getattr(X, f"UC_X86_REG_{name.upper()}"), value)
    assert finish_rep_stos(cpu) == 5
    cpu.regs.write(X.UC_X86_REG_RIP, target)
    cpu.regs.write(X.UC_X86_REG_RAX, 7)
    _run_to_hlt(cpu)
    assert cpu.regs.read(X.UC_X86_REG_RAX) == 7  # the NOPs ran, not the stale MOV
    cpu.close()
