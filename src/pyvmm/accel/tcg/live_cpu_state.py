"""Where an engine's CPU state lives, so pyvmm reads and writes it in place.

private_state.py found its fields' offsets inside a saved context (uc_context_save copies the
engine's CPUX86State after a header of its own) and reached them by saving the whole context,
patching the copy and restoring it: two copies of about 5.5 KB and two library calls for one
flag, several times per slice and per system call. The context's bytes are the engine's own
CPUX86State, inside its CPUState (X86CPU), so each offset has a live address: base + offset.

The base is found, not assumed: two registers are set to marker values through the register
API, the markers are looked up both in a saved context and in the CPUState's readable memory
(each exactly once), and the whole saved context must then equal the live bytes. A write
through the live address must read back through the register API. Anything else: None (the
caller copies contexts, as before). Also here: the SYSCALL MSRs, read in place (through the
API every read of an MSR runs pyvmm's RDMSR filter, a Python callback).
"""

from __future__ import annotations

import ctypes
import logging
import struct

log = logging.getLogger(__name__)

_MARKERS = (0x5059_564D_4D5F_4C49, 0x5645_5F53_5441_5445)  # "ILMMVYP", "ETATS_EV": unlikely bytes
_ENV_REACH = 0x100  # bytes past CPUState's icount_decr searched for the first registers
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084
EFER_SCE = 1


def _context_bytes(uc) -> bytes:
    context = uc.context_save()
    address = ctypes.cast(context.context, ctypes.c_void_p).value
    assert address is not None  # context_save() allocated it
    return ctypes.string_at(address, context.size)


def live_context_base(uc, cpu_address: int) -> int | None:
    """The address at which a context offset is the engine's own field, or None."""
    import unicorn.x86_const as X

    from .engine_state import _ReadableMemory, engine_offsets

    # CPUX86State follows QEMU's CPUNegativeOffsetState, which holds icount_decr: the registers
    # are near that field, and memory further on may hold other engines' or contexts' copies
    limit = engine_offsets().icount_high + _ENV_REACH
    registers = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX)  # regs[0], regs[1]: adjacent in CPUX86State
    kept = [uc.reg_read(r) for r in registers]
    try:
        for register, marker in zip(registers, _MARKERS):
            uc.reg_write(register, marker)
        pattern = struct.pack("<QQ", *_MARKERS)
        saved = _context_bytes(uc)
        span = _ReadableMemory().readable(cpu_address, limit)
        live = ctypes.string_at(cpu_address, span)
        if saved.count(pattern) != 1 or live.count(pattern) != 1:
            log.info("software CPU: the engine's CPU state was not found in place: contexts are copied")
            return None
        in_context = saved.index(pattern)
        base = cpu_address + live.index(pattern) - in_context
        if ctypes.string_at(base + in_context, len(saved) - in_context) != saved[in_context:]:
            log.info("software CPU: the engine's CPU state differs from its saved context: contexts are copied")
            return None
        ctypes.c_uint64.from_address(base + in_context + 8).value = _MARKERS[0]
        if uc.reg_read(X.UC_X86_REG_RCX) != _MARKERS[0]:
            log.info("software CPU: a write to the engine's CPU state did not read back: contexts are copied")
            return None
        return base
    finally:
        for register, value in zip(registers, kept):
            uc.reg_write(register, value)


class SyscallMsrs:
    """EFER, STAR, LSTAR and SFMASK of the CPU the engine holds, read in place."""

    def __init__(self, base: int, offsets: dict[int, int]) -> None:
        self._fields = [ctypes.c_uint64.from_address(base + offsets[msr])
                        for msr in (MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_FMASK)]

    def read(self) -> tuple[int, int, int, int]:
        efer, star, lstar, fmask = self._fields
        return efer.value, star.value, lstar.value, fmask.value

    @classmethod
    def find(cls, uc, base: int | None) -> "SyscallMsrs | None":
        """The MSRs in place (syscall_msr_offsets), checked against the API; None if not found."""
        if base is None:
            return None
        offsets = syscall_msr_offsets(uc)
        if offsets is None:
            log.info("software CPU: SYSCALL reads its MSRs through the API")
            return None
        msrs = cls(base, offsets)
        if msrs.read() != tuple(uc.msr_read(m) for m in (MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_FMASK)):
            return None
        return msrs


def syscall_msr_offsets(uc) -> dict[int, int] | None:
    """EFER, STAR, LSTAR and SFMASK -> context offset, each found as the one place a marker
    written through the MSR API shows (EFER: its SCE bit toggled), then put back. None if any
    is not unique."""
    offsets: dict[int, int] = {}
    for msr, marker in ((MSR_STAR, _MARKERS[0]), (MSR_LSTAR, _MARKERS[1]), (MSR_FMASK, _MARKERS[0] ^ 0xFF),
                        (MSR_EFER, None)):
        kept = uc.msr_read(msr)
        value = kept ^ EFER_SCE if marker is None else marker
        before = _context_bytes(uc)
        uc.msr_write(msr, value)
        after = _context_bytes(uc)
        uc.msr_write(msr, kept)
        found = [o for o in range(0, len(after) - 7, 8)
                 if struct.unpack_from("<Q", after, o)[0] == value and struct.unpack_from("<Q", before, o)[0] == kept]
        if len(found) != 1:
            log.info("software CPU: MSR %#x not found in the engine's CPU state", msr)
            return None
        offsets[msr] = found[0]
    return offsets


class ApiSyscallMsrs:
    """The same MSRs through the register API, where they were not found in place."""

    def __init__(self, regs) -> None:
        self._regs = regs

    def read(self) -> tuple[int, int, int, int]:
        read = self._regs.read_msr
        return read(MSR_EFER), read(MSR_STAR), read(MSR_LSTAR), read(MSR_FMASK)
