"""The engine's CPUState.halted says whether a slice ended on HLT (accel/tcg/halt_flag.py)."""

from __future__ import annotations

import pytest

U = pytest.importorskip("unicorn")
import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg import halt_flag  # noqa: E402
from pyvmm.accel.tcg.engine_state import EngineControl, engine_offsets  # noqa: E402

CODE = 0x1000


def test_the_flag_is_set_by_hlt_and_cleared_by_the_next_run():
    offsets = engine_offsets()
    assert halt_flag._discover(offsets) == halt_flag.halted_offset(offsets) is not None
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map(CODE, 0x1000)
    # mov $0xf4,%al (a HLT byte right before the next instruction); nop; hlt
    uc.mem_write(CODE, bytes.fromhex("b0f4" "90" "f4"))
    flag = halt_flag.halt_flag(EngineControl(uc, offsets).cpu_address, offsets)
    uc.emu_start(CODE, 0, count=1)  # stops after the MOV, behind an 0xF4 byte that is no HLT
    assert (uc.reg_read(X.UC_X86_REG_RIP), flag.value) == (CODE + 2, 0)
    uc.emu_start(CODE + 2, 0)
    assert (uc.reg_read(X.UC_X86_REG_RIP), flag.value) == (CODE + 4, 1)
    uc.emu_start(CODE, 0, count=1)
    assert flag.value == 0, "every run starts with the flag clear"
