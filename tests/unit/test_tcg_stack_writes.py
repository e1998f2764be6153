"""The stack page of a vCPU loses the translator's write check where it is mapped executable
(stack_writes.py): which pages, and that code written there still runs as written."""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg import stack_writes  # noqa: E402
from pyvmm.accel.tcg.stack_writes import release_stack_pages  # noqa: E402
from pyvmm.accel.tcg.vcpu import TcgVcpu  # noqa: E402
from pyvmm.arch.x86_64.boot_tables import long_mode_state  # noqa: E402
from pyvmm.arch.x86_64.paging import PTE_NX, PagingMode, translate  # noqa: E402
from pyvmm.accel.exits import Hlt  # noqa: E402

CODE = 0x10_0000
STACK_PAGE = 0x60_0000  # its own 2 MiB page of the identity map
EFER_NXE = 1 << 11


def _vcpu(translator, code: bytes, rsp: int, *, nx_stack: bool = False) -> TcgVcpu:
    memory = translator.memory
    memory.write(CODE, code)
    state = long_mode_state(memory, CODE)
    state.efer |= EFER_NXE
    if nx_stack:
        paging = PagingMode(state.cr0, state.cr3, state.cr4, state.efer)
        leaf = translate(memory, paging, STACK_PAGE).steps[-1][1]  # the 2 MiB page's PDE
        memory.write_u64(leaf, memory.read_u64(leaf) | PTE_NX)
    cpu = TcgVcpu(0, translator, cpuid_table=None)
    cpu.set_state(state)
    cpu.regs.write(X.UC_X86_REG_RSP, rsp)
    return cpu


def test_the_page_under_an_executable_stack_is_released(translator):
    cpu = _vcpu(translator, b"\xf4", STACK_PAGE + 0x900)
    assert release_stack_pages(cpu) == [STACK_PAGE]
    cpu.close()


def test_near_the_bottom_the_page_below_goes_too(translator):
    cpu = _vcpu(translator, b"\xf4", STACK_PAGE + 0x1000 + 0x10)
    assert release_stack_pages(cpu) == [STACK_PAGE + 0x1000, STACK_PAGE]
    cpu.close()


def test_a_non_executable_stack_is_left_to_the_translator(translator):
    cpu = _vcpu(translator, b"\xf4", STACK_PAGE + 0x900, nx_stack=True)
    assert release_stack_pages(cpu) == []
    cr3 = cpu.regs.read(X.UC_X86_REG_CR3)
    assert cpu.non_executable_stack_pages == {(cr3, STACK_PAGE)}
    cpu.close()


def test_a_stack_page_found_non_executable_is_not_walked_again_under_its_cr3(translator, monkeypatch):
    cpu = _vcpu(translator, b"\xf4", STACK_PAGE + 0x900, nx_stack=True)
    walks = []
    monkeypatch.setattr(stack_writes, "translate", lambda *args, **kw: walks.append(args[2]) or translate(*args, **kw))
    release_stack_pages(cpu)
    release_stack_pages(cpu)
    assert walks == [STACK_PAGE]
    cpu.regs.write(X.UC_X86_REG_RSP, STACK_PAGE + 0x10)  # near the bottom: the page below is new
    release_stack_pages(cpu)
    assert walks == [STACK_PAGE, STACK_PAGE - 0x1000]
    cpu.close()


def _run(cpu, rip: int) -> int:
    cpu.regs.write(X.UC_X86_REG_RIP, rip)
    cpu.regs.write(X.UC_X86_REG_RSP, STACK_PAGE + 0x800)
    assert isinstance(cpu.run(0.5), Hlt)
    return cpu.regs.read(X.UC_X86_REG_RAX)


LEA_STACK_CODE, CALL_RBX, HLT, MOV_EAX_ECX = bytes.fromhex("488d9c2400ffffff"), b"\xff\xd3", b"\xf4", b"\x89\xc1"


def _patch(n: int) -> bytes:
    return bytes.fromhex("c68424" "01ffffff") + bytes([n])  # movb $n, -0xff(%rsp): the immediate below


def test_code_on_the_stack_runs_as_last_written(translator):
    """`mov $n,%eax ; ret` lives on the stack page; the guest patches n and calls it. Code
    translated before a release must not survive it, and code translated after it must be
    dropped again when the guest patches it (the write check comes back with the translation)."""
    memory = translator.memory
    memory.write(STACK_PAGE + 0x700, bytes.fromhex("b801000000c3"))  # at rsp - 0x100
    cpu = _vcpu(translator, LEA_STACK_CODE + CALL_RBX + HLT, STACK_PAGE + 0x800)
    assert _run(cpu, CODE) == 1  # translated from the stack page
    cpu.regs.write(X.UC_X86_REG_RSP, STACK_PAGE + 0x800)
    assert release_stack_pages(cpu) == [STACK_PAGE]  # as run() does before every turn
    second = CODE + 0x100
    memory.write(second, _patch(2) + LEA_STACK_CODE + CALL_RBX + MOV_EAX_ECX + _patch(3) + CALL_RBX + HLT)
    assert _run(cpu, second) == 3  # the release dropped the `mov $1`
    assert cpu.regs.read(X.UC_X86_REG_RCX) == 2
    cpu.close()
