"""The software CPU's guest TSC: the host's TSC plus an offset per vCPU, so that a restored
vCPU's TSC goes on from its saved value instead of jumping by the time it spent saved.

Unicorn's RDTSC returns the host's TSC plus QEMU's `tsc_offset` (CPUX86State, kept for SVM
guests), which its API does not reach, and its IA32_TSC MSR read gives a stale field, not
what RDTSC returns. The offset's place in a saved context is found at run time: it is among
QEMU's SVM fields, which start at `vm_hsave` (an MSR write, VM_HSAVE_PA, marks it); each
8-byte field from there that is 0 at power-on is tried on a scratch instance, and the one
that moves RDTSC by exactly the value written is the offset (it must be unique).
"""

from __future__ import annotations

import ctypes
import struct

from .private_state import TcgUnsupported

MSR_VM_HSAVE_PA = 0xC0010117
_MARK = 0x5A5A_1234_0000
_CODE = 0x1000
_RDTSC_HLT = bytes.fromhex("0f31f4")
_TEST_OFFSET = 1 << 56
_MOST_TICKS_BETWEEN_READS = 1 << 40  # hours of host TSC: the probe's two reads are microseconds apart


def _scratch():
    import unicorn as U

    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map(_CODE, 0x1000)
    uc.mem_write(_CODE, _RDTSC_HLT)
    return uc


def _rdtsc(uc) -> int:
    import unicorn.x86_const as X

    uc.emu_start(_CODE, _CODE + len(_RDTSC_HLT) - 1)
    return (uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF) | (uc.reg_read(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32


def _context_bytes(uc) -> bytes:
    ctx = uc.context_save()
    return ctypes.string_at(ctypes.cast(ctx.context, ctypes.c_void_p), ctx.size)


def discover_offset() -> int:
    """Where tsc_offset lives in this Unicorn build's saved context (verified)."""
    uc = _scratch()
    before = _context_bytes(uc)
    uc.msr_write(MSR_VM_HSAVE_PA, _MARK)
    after = _context_bytes(uc)
    found = [o for o in range(0, len(after) - 7, 8)
             if struct.unpack_from("<Q", after, o)[0] == _MARK and struct.unpack_from("<Q", before, o)[0] != _MARK]
    if len(found) != 1:
        raise TcgUnsupported(f"cannot locate Unicorn's SVM state ({len(found)} candidates): "
                             "this unicorn build is not supported by pyvmm's software CPU")
    moving = [o for o in range(found[0] + 8, len(after) - 7, 8)
              if struct.unpack_from("<Q", after, o)[0] == 0 and _moves_rdtsc(o)]
    if len(moving) != 1:
        raise TcgUnsupported(f"cannot locate Unicorn's TSC offset ({len(moving)} candidates): "
                             "this unicorn build is not supported by pyvmm's software CPU")
    verify_offset(moving[0])
    return moving[0]


def _moves_rdtsc(field: int) -> bool:
    uc = _scratch()
    first = _rdtsc(uc)
    GuestTsc(uc, field).offset = _TEST_OFFSET
    return 0 <= _rdtsc(uc) - _TEST_OFFSET - first < _MOST_TICKS_BETWEEN_READS


def verify_offset(offset: int) -> None:
    uc = _scratch()
    tsc = GuestTsc(uc, offset)
    if tsc.offset != 0:
        raise TcgUnsupported("Unicorn's TSC offset is not where pyvmm expects it (not 0 at power-on)")
    if not _moves_rdtsc(offset):
        raise TcgUnsupported("Unicorn's TSC offset did not verify (RDTSC did not move with it)")


class GuestTsc:
    """Read and set one Unicorn instance's TSC offset (of the vCPU whose context it holds)."""

    def __init__(self, uc, offset: int) -> None:
        self.uc, self._field = uc, offset
        self._context = uc.context_save()
        address = ctypes.cast(self._context.context, ctypes.c_void_p).value
        if address is None:
            raise TcgUnsupported("uc_context_save gave no context")
        self._address: int = address

    @property
    def offset(self) -> int:
        self.uc.context_update(self._context)
        return ctypes.c_int64.from_address(self._address + self._field).value

    @offset.setter
    def offset(self, value: int) -> None:
        self.uc.context_update(self._context)
        ctypes.c_int64.from_address(self._address + self._field).value = value
        self.uc.context_restore(self._context)


_host = None


def host_tsc() -> int:
    """The host's TSC now, as Unicorn's RDTSC reads it (a scratch instance runs one RDTSC)."""
    global _host
    if _host is None:
        _host = _scratch()
    return _rdtsc(_host)


_cached: int | None = None


def _offset_from_json(stored: object) -> int:
    if type(stored) is not int:
        raise ValueError(f"not an offset: {stored!r}")
    return stored


def tsc_offset_field() -> int:
    global _cached
    if _cached is None:
        from .probe_cache import remembered

        _cached = remembered("tsc_offset", discover_offset, to_json=lambda offset: offset,
                             from_json=_offset_from_json, verify=verify_offset)
    return _cached
