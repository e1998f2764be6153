"""Code a guest rewrites through another mapping of its page runs as rewritten (code_aliases.py):
a vCPU calls a function, rewrites its immediate through a non-executable alias of the page, and
calls it again; Unicorn alone ran the first translation again (in Linux: a module's init code
running the previous module's translated block at the same address)."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("unicorn")

import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.exits import Hlt  # noqa: E402
from pyvmm.accel.tcg import code_aliases, helper_patch  # noqa: E402
from pyvmm.accel.tcg.engine_state import engine_offsets  # noqa: E402
from pyvmm.accel.tcg.vcpu import TcgVcpu  # noqa: E402
from pyvmm.arch.x86_64.boot_tables import long_mode_state  # noqa: E402
from pyvmm.arch.x86_64.paging import PTE_NX, PagingMode, translate  # noqa: E402

CODE, STACK = 0x10_0000, 0x18_0000
FUNCTION = 0x20_0800          # `mov $1,%eax; ret`, in the 2 MiB page at 2 MiB
ALIAS = 0x60_0000             # that page again, not executable
EFER_NXE = 1 << 11
CALL_RBX, HLT = b"\xff\xd3", b"\xf4"


TOUCH = code_aliases._store_byte(ALIAS, 0x90)     # a first write to the page, away from the function
REWRITE = code_aliases._store_byte(ALIAS + (FUNCTION & 0x1F_FFFF) + 1, 2)  # mov $1 -> mov $2


def _run(translator, code: bytes) -> int:
    memory = translator.memory
    memory.write(CODE, code)
    memory.write(FUNCTION, bytes.fromhex("b801000000c3"))
    state = long_mode_state(memory, CODE)
    state.efer |= EFER_NXE
    paging = PagingMode(state.cr0, state.cr3, state.cr4, state.efer)
    alias_pde = translate(memory, paging, ALIAS).steps[-1][1]
    flags = memory.read_u64(alias_pde) & 0xFFF  # present, writable, 2 MiB
    memory.write_u64(alias_pde, FUNCTION & ~0x1F_FFFF | flags | PTE_NX)
    cpu = TcgVcpu(0, translator, cpuid_table=None)
    try:
        cpu.set_state(state)
        cpu.regs.write(X.UC_X86_REG_RSP, STACK)
        cpu.regs.write(X.UC_X86_REG_RBX, FUNCTION)
        assert isinstance(cpu.run(0.5), Hlt)
        assert memory.read(FUNCTION + 1, 1) == b"\x02"
        return cpu.regs.read(X.UC_X86_REG_RAX)
    finally:
        cpu.close()


@pytest.mark.parametrize("code", [CALL_RBX + TOUCH + REWRITE + CALL_RBX + HLT,   # the first write drops what it overlaps
                                  TOUCH + CALL_RBX + REWRITE + CALL_RBX + HLT],  # the alias is flagged again
                         ids=["translated-then-written", "written-then-translated"])
def test_code_rewritten_through_an_alias_runs_as_rewritten(translator, code):
    assert translator.code_aliases_checked
    assert _run(translator, code) == 2


def test_the_check_sees_unicorns_own_behaviour(translator, monkeypatch):
    """With the patches off, the check guest runs the first translation (so `_check` can fail)."""
    for function in (code_aliases.SET_DIRTY, code_aliases.PROTECT_CODE):
        helper_patch.restore(function)
    try:
        assert "ran as first translated" in (code_aliases._check() or "")
    finally:
        monkeypatch.setattr(code_aliases, "_installed", None)
        assert code_aliases.install(engine_offsets().cpu)


def test_a_libunicorn_without_the_functions_keeps_its_behaviour_with_a_warning(monkeypatch, caplog):
    def missing(name):
        raise AttributeError(name)

    monkeypatch.setattr(code_aliases, "_symbol", missing)
    with caplog.at_level(logging.WARNING, logger=code_aliases.__name__):
        assert code_aliases._install(engine_offsets().cpu) is False
    assert "another mapping" in caplog.text and "tlb_set_dirty_x86_64" in caplog.text
