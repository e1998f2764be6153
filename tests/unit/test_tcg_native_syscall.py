"""SYSCALL in machine code (accel/tcg/native_syscall.py): the SDM's state, the cases it leaves to
the Python hook, and a check that fails when the stub is not there."""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg import helper_patch, native_syscall  # noqa: E402
from pyvmm.accel.tcg.engine_state import EngineControl, engine_offsets  # noqa: E402
from pyvmm.accel.tcg.live_cpu_state import live_context_base  # noqa: E402
from pyvmm.accel.tcg.private_state import _probe_uc, context_offsets  # noqa: E402

SYSCALL_AT, TARGET = 0x10800, 0x11000


@pytest.fixture(scope="module")
def context():
    offsets = context_offsets()
    if not native_syscall.install(offsets):
        pytest.skip("this libunicorn is not the build native_syscall.py knows")
    return offsets


def _engine(efer: int, register: bool):
    """A scratch guest at CPL 0 in 64-bit code about to run SYSCALL; its entry in the table."""
    uc = _probe_uc()
    uc.mem_write(SYSCALL_AT, bytes.fromhex("0f05" "f4"))  # syscall; hlt (where Unicorn's own SYSCALL goes on)
    uc.mem_write(TARGET, bytes.fromhex("f4"))
    uc.msr_write(0xC0000080, efer)
    uc.msr_write(0xC0000081, 0x08 << 32)
    uc.msr_write(0xC0000082, TARGET)
    uc.msr_write(0xC0000084, 0x700)
    native = None
    if register:
        live = live_context_base(uc, EngineControl(uc, engine_offsets()).cpu_address)
        env = native_syscall.env_address(uc, live)
        assert env is not None
        native = native_syscall.NativeSyscalls.attach(env)
        assert native is not None
    return uc, native


def test_the_stub_leaves_the_cpu_as_the_sdm_says(context):
    assert native_syscall._check(context) is None


def test_the_check_fails_on_unicorns_own_syscall(context):
    helper_patch.restore(native_syscall.HELPER)
    try:
        problem = native_syscall._check(context)
    finally:
        assert native_syscall._install(context)  # the stub back for the other tests
    assert problem is not None and problem.startswith("RFLAGS 0xed7")


@pytest.mark.parametrize("efer, register, why", [
    (0x500, True, "EFER.SCE clear: the #UD is the hook's"),
    (0x501, False, "an engine pyvmm did not register"),
])
def test_other_cases_fall_through_to_unicorns_helper(context, efer, register, why):
    uc, native = _engine(efer, register)
    uc.reg_write(X.UC_X86_REG_RCX, 0x1234)
    uc.emu_start(SYSCALL_AT, SYSCALL_AT + 3)  # Unicorn's SYSCALL (no hook): RIP moves past it
    assert uc.reg_read(X.UC_X86_REG_RIP) == SYSCALL_AT + 3, why
    assert uc.reg_read(X.UC_X86_REG_RCX) == 0x1234, why
    assert native is None or native.count == 0, why


def test_a_registered_engine_counts_its_syscalls(context):
    uc, native = _engine(0x501, True)
    uc.reg_write(X.UC_X86_REG_RFLAGS, 0x202 | 0x400)  # IF, DF: both in FMASK 0x700
    uc.emu_start(SYSCALL_AT, TARGET + 1)
    assert native.count == 1
    assert uc.reg_read(X.UC_X86_REG_RIP) == TARGET + 1
    assert uc.reg_read(X.UC_X86_REG_RCX) == SYSCALL_AT + 2
    assert uc.reg_read(X.UC_X86_REG_R11) == 0x602
    assert uc.reg_read(X.UC_X86_REG_RFLAGS) == 0x2
