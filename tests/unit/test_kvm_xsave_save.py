"""Saving a KVM vCPU's XSAVE area: KVM fills in PKRU where the host has it, whatever the guest's
XCR0 enables (seen on a host with PKU: xstate_bv 0x200 with XCR0 0x1); KVM_RUN's XSAVE may mark
a component in use that is in its initial configuration (seen: the SSE bit, about once in a
thousand immediate exits on this project's host)."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from pyvmm.accel.kvm.state import XSTATE_BV_OFFSET, _save_fpu
from pyvmm.arch.x86_64.cpu_state import FpuState
from pyvmm.kvm.system import CpuidEntry
from pyvmm.persist import StateError

PKRU, PKRU_OFFSET, AREA = 9, 0xA80, 0xA88
YMM, YMM_OFFSET = 2, 0x240
X87_SSE = 0x3


class _Fd:
    def __init__(self, xcr0: int, xstate_bv: int, pkru: int = 0, fxsave: bytes = bytes(512)) -> None:
        self.area = bytearray(AREA)
        self.area[:512] = fxsave
        struct.pack_into("<Q", self.area, XSTATE_BV_OFFSET, xstate_bv)
        struct.pack_into("<I", self.area, PKRU_OFFSET, pkru)
        self.xcr0 = xcr0

    def get_xsave(self, size: int) -> bytes:
        assert size == AREA
        return bytes(self.area)

    def get_xcrs(self):
        return SimpleNamespace(nr_xcrs=1, xcrs=[SimpleNamespace(xcr=0, value=self.xcr0)])


ACCEL = SimpleNamespace(xsave_size=AREA, supported_cpuid=[CpuidEntry(0xD, PKRU, 0, 8, PKRU_OFFSET, 0, 0),
                                                         CpuidEntry(0xD, YMM, 0, 256, YMM_OFFSET, 0, 0)])


def test_an_initial_pkru_beyond_xcr0_is_left_out():
    _, xsave = _save_fpu(ACCEL, _Fd(xcr0=X87_SSE, xstate_bv=X87_SSE | 1 << PKRU, pkru=0))
    assert xsave.xstate_bv == X87_SSE and xsave.components == {}


def test_a_pkru_the_guest_enabled_is_kept():
    _, xsave = _save_fpu(ACCEL, _Fd(xcr0=X87_SSE | 1 << PKRU, xstate_bv=X87_SSE | 1 << PKRU, pkru=0x55555554))
    assert xsave.xstate_bv >> PKRU & 1 and struct.unpack("<I", xsave.components[PKRU][:4])[0] == 0x55555554


def test_a_pkru_in_use_beyond_xcr0_is_not_dropped_silently():
    with pytest.raises(StateError, match="xstate_bv"):
        _save_fpu(ACCEL, _Fd(xcr0=X87_SSE, xstate_bv=X87_SSE | 1 << PKRU, pkru=4))


def test_components_in_their_initial_configuration_are_saved_as_not_in_use():
    """The same vCPU state saves the same way whatever XINUSE said."""
    reset = FpuState.reset().fxsave()
    fpu, xsave = _save_fpu(ACCEL, _Fd(xcr0=X87_SSE | 1 << YMM, xstate_bv=X87_SSE | 1 << YMM, fxsave=reset))
    assert fpu == FpuState.reset() and xsave.xstate_bv == 0 and xsave.components == {}


def test_legacy_and_ymm_contents_make_their_bits():
    fxsave = bytearray(FpuState.reset().fxsave())
    fxsave[160] = 1  # XMM0
    fd = _Fd(xcr0=X87_SSE | 1 << YMM, xstate_bv=X87_SSE | 1 << YMM, fxsave=bytes(fxsave))
    fd.area[YMM_OFFSET + 255] = 9
    _, xsave = _save_fpu(ACCEL, fd)
    assert xsave.xstate_bv == 1 << 1 | 1 << YMM and xsave.components[YMM][255] == 9
