"""Reach the three pieces of translator state that Unicorn keeps private.

Unicorn never delivers x86 exceptions itself, so pyvmm does, and for that it
must read and write state the register API does not expose:

- error_code:     the error code of the exception being raised (#GP, #PF, ...);
- old_exception:  QEMU's double-fault tracking, which only its own (bypassed)
                  delivery code resets — left alone, the second fault of a boot
                  becomes a #DF;
- hflags:         the current privilege level lives in its low two bits; the
                  register API refuses to load a DPL0 CS while CPL is 3, so
                  delivering an interrupt from user mode starts by setting it.

Their offsets inside a saved context differ between builds, so they are found
at run time: a probe guest raises known faults at CPL0 and CPL3 on a scratch
Unicorn instance, and each offset must be the unique one that behaves as
expected. Then the offsets are verified by using them. Any doubt → TcgUnsupported.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import struct

from ...errors import UserError

log = logging.getLogger(__name__)

# QEMU's hflags bits that identify 64-bit protected mode (target/i386/cpu.h).
HF_CPL_MASK = 0x3
HF_INHIBIT_IRQ_MASK = 1 << 3
HF_PE_MASK = 1 << 7
HF_LMA_MASK = 1 << 14
HF_CS64_MASK = 1 << 15
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5
HF_ADDSEG_MASK = 1 << 6
_HF_LONG_MODE = HF_PE_MASK | HF_LMA_MASK | HF_CS64_MASK

PROBE_BASE = 0x10000
PROBE_ERROR_1 = 0x1234  # error code of loading selector 0x1237 (RPL bits are not part of it)
PROBE_ERROR_2 = 0x5678


class TcgUnsupported(UserError, RuntimeError):
    """The installed Unicorn cannot be used as pyvmm's software CPU; the message says why."""


@dataclasses.dataclass(frozen=True)
class ContextOffsets:
    hflags: int
    error_code: int
    old_exception: int
    segments: int  # QEMU's SegmentCache segs[6] (ES, CS, SS, DS, FS, GS): selector, base, limit, flags


# QEMU's SegmentCache: u32 selector, (pad), u64 base, u32 limit, u32 flags.
HF2_NMI_MASK = 1 << 2  # hflags2: NMIs blocked until IRET
SEGMENT_CACHE_SIZE = 24
SEGMENT_INDEX = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}
# What SYSCALL loads (QEMU's helper_syscall, the SDM): CS G P S code/read/accessed L, DPL 0;
# SS G B P S data/write/accessed, DPL 0 -- in QEMU's layout (the descriptor's high dword).
SYSCALL_CS_FLAGS = 0x00A09B00
SYSCALL_SS_FLAGS = 0x00C09300
SYSENTER32_CS_FLAGS = 0x00C09B00  # SYSENTER outside long mode: G D P S code/read/accessed, DPL 0


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


class PrivateState:
    """Read/patch the private fields of one Unicorn instance: in the engine's CPU state itself
    where it was found (live_cpu_state.py), else through uc_context save/restore."""

    def __init__(self, uc, offsets: ContextOffsets, live: int | None = None) -> None:
        """`live`: the address at which a context offset is the engine's own field
        (live_cpu_state.live_context_base), None to copy contexts."""
        self.uc = uc
        self.offsets = offsets
        self._context = uc.context_save()
        self._size = self._context.size
        self.live = live
        # In the engine's own state the fields stay where they are: their ctypes views are made
        # once (read() and hflags() run a few times per slice).
        self._live_fields = None if live is None else (
            ctypes.c_uint32.from_address(live + offsets.hflags), ctypes.c_uint32.from_address(live + offsets.error_code),
            ctypes.c_int32.from_address(live + offsets.old_exception))
        # Bound once: _save/_restore run several times per guest exception. (Imported here, not
        # at module level: this module must load without unicorn, to report it missing.)
        from unicorn.unicorn_py3.unicorn import uclib  # the binding's own ctypes handle

        self._uc_context_save, self._uc_context_restore = uclib.uc_context_save, uclib.uc_context_restore
        address = ctypes.cast(self._context.context, ctypes.c_void_p).value
        assert address is not None  # uc_context_alloc succeeded
        self._context_address: int = address

    def _save(self) -> int:
        """Save the CPU into our context; returns the address of its bytes (the engine's own,
        live, when known: then _restore has nothing to do)."""
        if self.live is not None:
            return self.live
        status = self._uc_context_save(self.uc._uch, self._context.context)
        if status:
            raise TcgUnsupported(f"uc_context_save failed ({status})")
        return self._context_address

    def _restore(self) -> None:
        if self.live is not None:
            return
        status = self._uc_context_restore(self.uc._uch, self._context.context)
        if status:
            raise TcgUnsupported(f"uc_context_restore failed ({status})")

    def read(self) -> tuple[int, int, int]:
        """(hflags, error_code, old_exception) of the CPU right now."""
        if self._live_fields is not None:
            hflags_field, error_field, old_field = self._live_fields
            return hflags_field.value, error_field.value, old_field.value
        base = self._save()
        off = self.offsets
        hflags = ctypes.c_uint32.from_address(base + off.hflags).value
        error = ctypes.c_uint32.from_address(base + off.error_code).value
        old = ctypes.c_int32.from_address(base + off.old_exception).value
        return hflags, error, old

    def error_code(self) -> int:
        return self.read()[1]

    def hflags(self) -> int:
        if self._live_fields is not None:
            return self._live_fields[0].value
        return self.read()[0]

    def nmi_blocked(self) -> bool:
        """True from an NMI's delivery until the next IRET (QEMU's HF2_NMI_MASK, which the
        engine's IRET clears; hflags2 follows hflags in CPUX86State)."""
        base = self._save()
        return bool(ctypes.c_uint32.from_address(base + self.offsets.hflags + 4).value & HF2_NMI_MASK)

    def block_nmi(self) -> None:
        base = self._save()
        flags2 = ctypes.c_uint32.from_address(base + self.offsets.hflags + 4)
        flags2.value |= HF2_NMI_MASK
        self._restore()

    def interrupts_inhibited(self) -> bool:
        """True in the shadow of STI or MOV SS, where an interrupt must not be taken."""
        return bool(self.hflags() & HF_INHIBIT_IRQ_MASK)

    def set_code_size(self, long_code: bool, default_32: bool) -> None:
        """Make the translator decode CS as 64-bit (L=1), 32-bit (D=1) or 16-bit code.

        Unicorn's register API loads a CS selector without recomputing these hflags bits,
        which only the CPU's own far jumps and mode switches do."""
        hflags = self.hflags()
        wanted = hflags & ~(HF_CS64_MASK | HF_CS32_MASK | HF_SS32_MASK)
        if long_code and hflags & HF_LMA_MASK:
            wanted |= HF_CS64_MASK | HF_CS32_MASK | HF_SS32_MASK
        elif default_32:
            wanted |= HF_CS32_MASK | HF_SS32_MASK
        if wanted != hflags:
            base = self._save()
            ctypes.c_uint32.from_address(base + self.offsets.hflags).value = wanted
            self._restore()

    def load_segment(self, name: str, selector: int, base: int, limit: int, flags: int) -> None:
        """Set a segment register's hidden part, which the register API does not reach
        (it writes the selector only). `flags` uses QEMU's layout: the descriptor's high dword."""
        base_address = self._save()
        cache = base_address + self.offsets.segments + SEGMENT_INDEX[name] * SEGMENT_CACHE_SIZE
        ctypes.c_uint32.from_address(cache).value = selector
        ctypes.c_uint64.from_address(cache + 8).value = base
        ctypes.c_uint32.from_address(cache + 16).value = limit
        ctypes.c_uint32.from_address(cache + 20).value = flags
        self._restore()

    def read_segments(self) -> dict[str, tuple[int, int, int, int]]:
        """Every segment register's cache: name -> (selector, base, limit, flags in QEMU's layout)."""
        base_address = self._save()
        out = {}
        for name, index in SEGMENT_INDEX.items():
            cache = base_address + self.offsets.segments + index * SEGMENT_CACHE_SIZE
            out[name] = (ctypes.c_uint32.from_address(cache).value, ctypes.c_uint64.from_address(cache + 8).value,
                         ctypes.c_uint32.from_address(cache + 16).value, ctypes.c_uint32.from_address(cache + 20).value)
        return out

    def set_translation_flags(self, *, cpl: int, code64: bool, code32: bool, stack32: bool, addseg: bool,
                              inhibit_irq: bool) -> None:
        """The hflags a restored state implies (QEMU derives them as it loads segments, which a
        restore does behind its back), with no exception in flight."""
        base = self._save()
        off = self.offsets
        flags = ctypes.c_uint32.from_address(base + off.hflags)
        value = flags.value & ~(HF_CPL_MASK | HF_CS64_MASK | HF_CS32_MASK | HF_SS32_MASK | HF_ADDSEG_MASK
                                | HF_INHIBIT_IRQ_MASK)
        value |= cpl & HF_CPL_MASK
        value |= (HF_CS64_MASK if code64 else 0) | (HF_CS32_MASK if code32 else 0) | (HF_SS32_MASK if stack32 else 0)
        value |= (HF_ADDSEG_MASK if addseg else 0) | (HF_INHIBIT_IRQ_MASK if inhibit_irq else 0)
        flags.value = value
        ctypes.c_int32.from_address(base + off.old_exception).value = -1
        self._restore()

    def enter_syscall_target(self, kernel_cs: int, long_code: bool = True) -> None:
        """SYSCALL in long mode: CPL 0 and the fixed CS and SS the SDM loads (selectors from
        STAR, descriptors not read from the GDT: flat, DPL 0, CS 64-bit), with no exception in
        flight -- one context round trip for the whole transition. The hidden parts matter:
        a saved state takes the CPL from SS.DPL, as KVM does."""
        base = self._save()
        off = self.offsets
        ctypes.c_int32.from_address(base + off.old_exception).value = -1
        flags = ctypes.c_uint32.from_address(base + off.hflags)
        code64 = HF_CS64_MASK if long_code else 0  # SYSENTER outside long mode: 32-bit code
        flags.value = (flags.value & ~(HF_CPL_MASK | HF_CS64_MASK)) | code64 | HF_CS32_MASK | HF_SS32_MASK
        cs_flags = SYSCALL_CS_FLAGS if long_code else SYSENTER32_CS_FLAGS
        for name, selector, attributes in (("cs", kernel_cs, cs_flags), ("ss", kernel_cs + 8, SYSCALL_SS_FLAGS)):
            cache = base + off.segments + SEGMENT_INDEX[name] * SEGMENT_CACHE_SIZE
            ctypes.c_uint32.from_address(cache).value = selector
            ctypes.c_uint64.from_address(cache + 8).value = 0
            ctypes.c_uint32.from_address(cache + 16).value = 0xFFFFFFFF
            ctypes.c_uint32.from_address(cache + 20).value = attributes
        self._restore()

    def finish_exception(self, new_cpl: int | None = None) -> int:
        """After pyvmm delivered an exception: forget it (no spurious #DF later), and set CPL.
        (Written back only if that changes anything: this also runs before every slice.)
        Returns hflags as they now are."""
        base = self._save()
        off = self.offsets
        old = ctypes.c_int32.from_address(base + off.old_exception)
        changed = old.value != -1
        old.value = -1
        if new_cpl is not None:
            flags = ctypes.c_uint32.from_address(base + off.hflags)
            changed |= flags.value & HF_CPL_MASK != new_cpl
            flags.value = (flags.value & ~HF_CPL_MASK) | new_cpl
        if changed:
            self._restore()
        return ctypes.c_uint32.from_address(base + off.hflags).value


# --- discovery ------------------------------------------------------------------------------

# 64-bit probe, linked at PROBE_BASE. Entered at CPL0 in long mode with the GDT below.
#   mov $0x1237,%ax ; mov %ax,%ds        -> #GP(0x1234) at CPL0
#   lgdt ; iretq to CPL3
#   mov $0x567b,%ax ; mov %ax,%es        -> #GP(0x5678) at CPL3 (a #DF unless old_exception was reset)
#   jmp .
def _probe_code() -> bytes:
    code = bytearray()
    code += bytes.fromhex("66b83712")          # mov $0x1237,%ax
    code += bytes.fromhex("8ed8")              # mov %eax,%ds  -> #GP at CPL0
    code += bytes.fromhex("6a1b")              # push $0x1b (user SS)
    code += bytes.fromhex("6800f00100")        # push $0x1f000 (user RSP)
    code += bytes.fromhex("6a02")              # push $2 (RFLAGS)
    code += bytes.fromhex("6a23")              # push $0x23 (user CS)
    user_rip_at = len(code) + 1
    code += bytes.fromhex("6800000000")        # push $user
    code += bytes.fromhex("48cf")              # iretq
    user = len(code)
    code += bytes.fromhex("66b87b56")          # mov $0x567b,%ax
    code += bytes.fromhex("8ec0")              # mov %eax,%es  -> #GP at CPL3
    code += bytes.fromhex("ebfe")              # jmp .
    code[user_rip_at:user_rip_at + 4] = struct.pack("<I", PROBE_BASE + user)
    return bytes(code)


_PROBE_GDT = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF]
_GDT_AT, _PML4_AT, _PDPT_AT, _PD_AT = 0x1000, 0x2000, 0x3000, 0x4000


def _probe_uc():
    import unicorn as U
    import unicorn.x86_const as X

    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map(0, 0x200000)
    uc.mem_write(_GDT_AT, b"".join(struct.pack("<Q", d) for d in _PROBE_GDT))
    uc.mem_write(_PML4_AT, struct.pack("<Q", _PDPT_AT | 7))
    uc.mem_write(_PDPT_AT, struct.pack("<Q", _PD_AT | 7))
    uc.mem_write(_PD_AT, struct.pack("<Q", 0x87))  # first 2 MiB, user-accessible
    uc.mem_write(PROBE_BASE, _probe_code())
    uc.reg_write(X.UC_X86_REG_GDTR, (0, _GDT_AT, 8 * len(_PROBE_GDT) - 1, 0))
    uc.reg_write(X.UC_X86_REG_CR3, _PML4_AT)
    uc.reg_write(X.UC_X86_REG_CR4, 0x20)
    uc.msr_write(0xC0000080, 0x500)
    uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
    uc.reg_write(X.UC_X86_REG_SS, 0x10)
    uc.reg_write(X.UC_X86_REG_DS, 0x10)
    uc.reg_write(X.UC_X86_REG_CS, 0x08)
    uc.reg_write(X.UC_X86_REG_RSP, 0x1FF00)
    return uc


def _raw(uc) -> bytes:
    ctx = uc.context_save()
    address = ctypes.cast(ctx.context, ctypes.c_void_p).value
    assert address is not None  # context_save() allocated it
    return ctypes.string_at(address, ctx.size)


def discover_offsets() -> ContextOffsets:
    """Find hflags, error_code and old_exception in this Unicorn build's context, then verify them."""
    try:
        import unicorn as U
        import unicorn.x86_const as X
    except ImportError as exc:
        raise TcgUnsupported(f"the software CPU needs the Python package unicorn: {exc}") from None

    uc = _probe_uc()
    snaps: list[tuple[int, int, bytes]] = []

    def on_interrupt(uc, vector, _):
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        snaps.append((vector, uc.reg_read(X.UC_X86_REG_CS) & 3, _raw(uc)))
        uc.reg_write(X.UC_X86_REG_RIP, rip + 2)  # both faulting instructions are 2 bytes
        if len(snaps) == 2:
            uc.emu_stop()

    start = _raw(uc)
    uc.hook_add(U.UC_HOOK_INTR, on_interrupt)
    uc.emu_start(PROBE_BASE, 0, count=200)
    if len(snaps) != 2 or snaps[0][0] != 13:
        raise TcgUnsupported("the probe guest did not raise the expected #GP (unexpected Unicorn behaviour)")
    (_, cpl_a, at_gp0), (vector_b, cpl_b, at_gp3) = snaps
    if cpl_a != 0 or cpl_b != 3:
        raise TcgUnsupported("the probe guest did not reach CPL3 through IRETQ")
    size = len(start)

    def unique(predicate, what: str) -> int:
        found = [off for off in range(0, size - 3, 4) if predicate(off)]
        if len(found) != 1:
            raise TcgUnsupported(f"cannot locate Unicorn's private {what} ({len(found)} candidates): "
                                 "this unicorn build is not supported by pyvmm's software CPU")
        return found[0]

    error_code = unique(lambda o: _u32(at_gp0, o) == PROBE_ERROR_1 and _u32(start, o) != PROBE_ERROR_1, "error_code")
    old_exception = unique(lambda o: _u32(start, o) == 0xFFFFFFFF and _u32(at_gp0, o) == 13, "old_exception")
    hflags = unique(lambda o: (_u32(at_gp0, o) & _HF_LONG_MODE) == _HF_LONG_MODE
                    and _u32(at_gp0, o) & HF_CPL_MASK == 0 and _u32(at_gp3, o) == _u32(at_gp0, o) | 3, "hflags")
    # segs[R_SS].selector is 0x10 at CPL0 and 0x1b at CPL3; the array starts two caches before it
    ss = unique(lambda o: _u32(at_gp0, o) == 0x10 and _u32(at_gp3, o) == 0x1B, "segment cache")
    segments = ss - 2 * SEGMENT_CACHE_SIZE
    if segments < 0 or _u32(at_gp0, segments + SEGMENT_CACHE_SIZE) != 0x08 or _u32(at_gp3, segments + SEGMENT_CACHE_SIZE) != 0x23:
        raise TcgUnsupported("Unicorn's segment cache layout is not the one pyvmm knows (CS does not precede SS)")
    offsets = ContextOffsets(hflags=hflags, error_code=error_code, old_exception=old_exception, segments=segments)
    if vector_b == 13:
        raise TcgUnsupported("this unicorn build resets its double-fault tracking itself; pyvmm's delivery assumes it does not")
    _verify(offsets)
    log.debug("unicorn private state offsets: %s", offsets)
    return offsets


def _verify(offsets: ContextOffsets) -> None:
    """Run the probe again, resetting old_exception and switching CPL through the offsets."""
    import unicorn as U
    import unicorn.x86_const as X

    uc = _probe_uc()
    state = PrivateState(uc, offsets)
    seen: list[tuple[int, int]] = []

    def on_interrupt(uc, vector, _):
        seen.append((vector, state.error_code()))
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if len(seen) == 2:
            # back to CPL0 the way exception delivery will do it
            state.finish_exception(new_cpl=0)
            uc.reg_write(X.UC_X86_REG_CS, 0x08)
            uc.reg_write(X.UC_X86_REG_SS, 0x10)
            seen.append((-1, uc.reg_read(X.UC_X86_REG_CS)))
            uc.emu_stop()
            return
        state.finish_exception()
        uc.reg_write(X.UC_X86_REG_RIP, rip + 2)

    uc.hook_add(U.UC_HOOK_INTR, on_interrupt)
    uc.emu_start(PROBE_BASE, 0, count=200)
    expected = [(13, PROBE_ERROR_1), (13, PROBE_ERROR_2), (-1, 0x08)]
    if seen != expected:
        raise TcgUnsupported(f"unicorn private state offsets did not verify (saw {seen}, expected {expected})")


_cached: ContextOffsets | None = None


def context_offsets() -> ContextOffsets:
    global _cached
    if _cached is None:
        from .probe_cache import remembered

        _cached = remembered("context_offsets", discover_offsets, to_json=dataclasses.asdict,
                             from_json=lambda fields: ContextOffsets(**fields), verify=_verify)
    return _cached
