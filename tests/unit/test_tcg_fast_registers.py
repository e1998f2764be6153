"""FastRegisters (accel/tcg/fast_registers.py): reads give the register's value only, whatever
an earlier read left in the shared buffer (Unicorn writes 16 bits for a segment selector)."""

from __future__ import annotations

import pytest

U = pytest.importorskip("unicorn")
import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg.fast_registers import FastRegisters  # noqa: E402


def test_a_selector_read_after_a_wide_one_has_no_stale_upper_bits():
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    regs = FastRegisters(uc)
    regs.write(X.UC_X86_REG_RAX, 0xFFFF_FFFF_FFFF_0000)
    uc.reg_write(X.UC_X86_REG_DS, 0x2B)
    assert regs.read(X.UC_X86_REG_RAX) == 0xFFFF_FFFF_FFFF_0000
    assert regs.read(X.UC_X86_REG_DS) == 0x2B
    regs.write(X.UC_X86_REG_RBX, 0x1234_5678_9ABC_DEF0)
    assert regs.read(X.UC_X86_REG_RBX) == 0x1234_5678_9ABC_DEF0
    assert regs.read(X.UC_X86_REG_CS) == uc.reg_read(X.UC_X86_REG_CS) < 0x10000
