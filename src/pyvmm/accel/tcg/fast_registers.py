"""Register and MSR access for the software CPU's hot paths (SYSCALL, CPUID, event delivery).

Unicorn's Python `reg_read`/`reg_write` pick a ctypes class per register on every call,
which costs about as much as the call itself; a guest system call made a dozen of them.
These go straight to the C API with buffers allocated once, for the 64-bit general,
segment-selector, control and flags registers (not GDTR/IDTR or FP/SSE: use the binding).
"""

from __future__ import annotations

import ctypes

from unicorn import UcError
from unicorn.unicorn_py3.unicorn import uclib
import unicorn.x86_const as X


class _Msr(ctypes.Structure):
    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class FastRegisters:
    def __init__(self, uc) -> None:
        self._uch = uc._uch
        self._value = ctypes.c_uint64()
        self._value_ref = ctypes.byref(self._value)
        self._msr = _Msr()
        self._msr_ref = ctypes.byref(self._msr)

    def read(self, reg_id: int) -> int:
        self._value.value = 0  # Unicorn writes only a selector's 16 bits: no stale upper bits
        status = uclib.uc_reg_read(self._uch, reg_id, self._value_ref)
        if status:
            raise UcError(status)
        return self._value.value

    def write(self, reg_id: int, value: int) -> None:
        self._value.value = value & 0xFFFFFFFFFFFFFFFF
        status = uclib.uc_reg_write(self._uch, reg_id, self._value_ref)
        if status:
            raise UcError(status)

    def read_msr(self, index: int) -> int:
        self._msr.rid = index
        status = uclib.uc_reg_read(self._uch, X.UC_X86_REG_MSR, self._msr_ref)
        if status:
            raise UcError(status)
        return self._msr.value
