"""SYSCALL in 64-bit code done by machine code inside the engine, without a trip through Python.

Unicorn's SYSCALL (helper_syscall) does not do what the SDM says: it calls the UC_HOOK_INSN
hooks and moves RIP past the instruction. pyvmm's hook does the rest in Python (vcpu.syscall):
about 33 Python calls per system call, and a guest makes hundreds of thousands of them (busybox
nc makes five per KiB it sends). So the entry of helper_syscall is given machine code that does
the common case itself -- a registered engine, EFER.SCE and EFER.LMA set, called from 64-bit
code -- and falls through to Unicorn's helper (and so to the Python hook) for everything else:

    look env up in the table of registered engines (env, count); not there: fall through
    EFER.SCE and EFER.LMA, HF_CS64 (64-bit code)? else fall through
    count += 1
    rflags = env->eflags | cc_compute_all(cc_dst, cc_src, cc_src2, cc_op) | (df & DF)
    RCX = eip + the instruction's length;  R11 = rflags
    rflags &= ~(FMASK | RF), loaded as QEMU keeps it (arithmetic flags in CC_SRC, CC_OP_EFLAGS,
    df = +1/-1, the rest in env->eflags)
    CS = STAR[47:32] & ~3, SS = CS + 8, with the flat descriptors the SDM loads; CPL 0, CS64,
    CS32, SS32 in hflags; no exception in flight (old_exception = -1)
    eip = LSTAR; return to the translated code (which ends the block)

The CPU state's offsets are found and checked, not assumed: RAX, RIP, R11 by marker values
written through the register API; the SYSCALL MSRs as live_cpu_state finds them; hflags, the
segment caches and old_exception from private_state's probe; EFLAGS, CC_SRC, CC_OP and DF
(between RIP and hflags, in QEMU's order) by loading RFLAGS through the API. Then a scratch guest must come out of
SYSCALL in the state the SDM gives, for two sets of flags and masks. Any doubt: the stub is not
used and every SYSCALL takes the Python path, as before.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import struct
import threading
import weakref

from . import helper_patch

log = logging.getLogger(__name__)

HELPER = "helper_syscall_x86_64"
CC_COMPUTE_ALL = "helper_cc_compute_all_x86_64"
# push %r15; mov %rdi,%r15; push %r14; push %r13; movslq %esi,%r13; push %r12: this build's
# first 14 bytes, position-independent, displaced behind the stub
PROLOGUE = bytes.fromhex("4157" "4989ff" "4156" "4155" "4c63ee" "4154")
TABLE_SIZE = 64  # engines at once in one process (one per VM)

EFER_SCE, EFER_LMA = 0x1, 0x400
RFLAGS_RF, RFLAGS_DF = 0x10000, 0x400
ARITHMETIC_FLAGS = 0x8D5  # OF SF ZF AF PF CF: QEMU keeps them in CC_SRC
CC_OP_EFLAGS = 1
HF_CPL_MASK, HF_CS32_MASK, HF_SS32_MASK, HF_CS64_MASK = 0x3, 0x10, 0x20, 0x8000
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084
_MARKER = 0x5359_5343_414C_4C21  # "!LLACSYS"


class _Entry(ctypes.Structure):
    _fields_ = [("env", ctypes.c_uint64), ("count", ctypes.c_uint64)]


_table = (_Entry * TABLE_SIZE)()
_lock = threading.RLock()  # (the check attaches an engine while install() holds it)
_installed: bool | None = None  # the process's answer, once asked


@dataclasses.dataclass(frozen=True)
class EnvOffsets:
    """Offsets from CPUX86State (the `env` the helper receives) of what the stub reads and writes."""
    rcx: int
    r11: int
    eip: int
    eflags: int
    cc_dst: int
    cc_src: int
    cc_src2: int
    cc_op: int
    df: int
    hflags: int
    segments: int
    old_exception: int
    efer: int
    star: int
    lstar: int
    fmask: int


def _disp(offset: int) -> bytes:
    return struct.pack("<i", offset)


def stub(off: EnvOffsets, table: int, cc_compute_all: int, cs_flags: int, ss_flags: int,
         segment_size: int) -> bytes:
    """The machine code in front of helper_syscall (see above); it falls through at its end."""
    cs, ss = off.segments + segment_size, off.segments + 2 * segment_size  # segs[R_CS], segs[R_SS]
    find = (bytes.fromhex("48b8") + struct.pack("<Q", table)            # movabs $table,%rax
            + bytes.fromhex("b9") + struct.pack("<I", TABLE_SIZE))      # mov $N,%ecx
    loop = (bytes.fromhex("483938" "740d"                               # cmp %rdi,(%rax); je found
                          "4883c010" "ffc9" "75f3"))                    # add $16,%rax; dec %ecx; jnz loop
    checks = (bytes.fromhex("488b97") + _disp(off.efer)                 # mov efer(%rdi),%rdx
              + bytes.fromhex("81e2") + struct.pack("<I", EFER_SCE | EFER_LMA)
              + bytes.fromhex("81fa") + struct.pack("<I", EFER_SCE | EFER_LMA))
    cs64 = bytes.fromhex("f787") + _disp(off.hflags) + struct.pack("<I", HF_CS64_MASK)  # testl $CS64,hflags
    body = (bytes.fromhex("48ff4008"                                    # incq 8(%rax): count
                          "57" "56" "4883ec08")                         # push %rdi; push %rsi; align
            + bytes.fromhex("8b8f") + _disp(off.cc_op)                  # mov cc_op,%ecx
            + bytes.fromhex("488b97") + _disp(off.cc_src2)              # mov cc_src2,%rdx
            + bytes.fromhex("488bb7") + _disp(off.cc_src)               # mov cc_src,%rsi
            + bytes.fromhex("488bbf") + _disp(off.cc_dst)               # mov cc_dst,%rdi
            + bytes.fromhex("48b8") + struct.pack("<Q", cc_compute_all)
            + bytes.fromhex("ffd0" "4883c408" "5e" "5f")                # call *%rax; restore
            + bytes.fromhex("480b87") + _disp(off.eflags)               # or eflags,%rax
            + bytes.fromhex("486397") + _disp(off.df)                   # movslq df,%rdx
            + bytes.fromhex("81e2") + struct.pack("<I", RFLAGS_DF)      # and $DF,%edx
            + bytes.fromhex("4809d0")                                   # or %rdx,%rax: RFLAGS
            + bytes.fromhex("488987") + _disp(off.r11)                  # mov %rax,r11
            + bytes.fromhex("488b97") + _disp(off.eip)                  # mov eip,%rdx
            + bytes.fromhex("4863f6" "4801f2")                          # movslq %esi,%rsi; add %rsi,%rdx
            + bytes.fromhex("488997") + _disp(off.rcx)                  # mov %rdx,rcx
            + bytes.fromhex("488b97") + _disp(off.fmask)                # mov fmask,%rdx
            + bytes.fromhex("4881ca") + struct.pack("<I", RFLAGS_RF)    # or $RF,%rdx
            + bytes.fromhex("48f7d2" "4821d0")                          # not %rdx; and %rdx,%rax
            + bytes.fromhex("89c2" "81e2") + struct.pack("<I", ARITHMETIC_FLAGS)
            + bytes.fromhex("488997") + _disp(off.cc_src)               # cc_src = arithmetic flags
            + bytes.fromhex("c787") + _disp(off.cc_op) + struct.pack("<I", CC_OP_EFLAGS)
            + bytes.fromhex("89c2" "c1ea09" "83e202" "f7da" "ffc2")      # edx = 1 - 2 * DF
            + bytes.fromhex("8997") + _disp(off.df)
            + bytes.fromhex("4825") + struct.pack("<i", ~(ARITHMETIC_FLAGS | RFLAGS_DF))
            + bytes.fromhex("4883c802")                                 # or $2,%rax (bit 1 reads as 1)
            + bytes.fromhex("488987") + _disp(off.eflags)
            + bytes.fromhex("488b97") + _disp(off.star)                 # mov star,%rdx
            + bytes.fromhex("48c1ea20" "81e2fcff0000"))                 # shr $32; and $0xfffc
    for cache, flags in ((cs, cs_flags), (ss, ss_flags)):
        body += (bytes.fromhex("8997") + _disp(cache)                   # selector
                 + bytes.fromhex("48c787") + _disp(cache + 8) + struct.pack("<i", 0)            # base
                 + bytes.fromhex("c787") + _disp(cache + 16) + struct.pack("<I", 0xFFFFFFFF)  # limit
                 + bytes.fromhex("c787") + _disp(cache + 20) + struct.pack("<I", flags))       # flags
        if cache == cs:
            body += bytes.fromhex("83c208" "81e2fcff0000")              # SS = (CS + 8) & 0xfffc
    body += (bytes.fromhex("8b97") + _disp(off.hflags)
             + bytes.fromhex("81e2") + struct.pack("<I", ~(HF_CPL_MASK | HF_CS64_MASK) & 0xFFFFFFFF)
             + bytes.fromhex("81ca") + struct.pack("<I", HF_CS64_MASK | HF_CS32_MASK | HF_SS32_MASK)
             + bytes.fromhex("8997") + _disp(off.hflags)
             + bytes.fromhex("c787") + _disp(off.old_exception) + struct.pack("<i", -1)
             + bytes.fromhex("488b97") + _disp(off.lstar)
             + bytes.fromhex("488997") + _disp(off.eip)
             + bytes.fromhex("c3"))
    # the conditions jump to the end of the stub: the displaced prologue, then the helper
    after_cs64 = body
    jz_cs64 = bytes.fromhex("0f84") + struct.pack("<i", len(after_cs64))
    after_checks = cs64 + jz_cs64 + after_cs64
    jne_checks = bytes.fromhex("0f85") + struct.pack("<i", len(after_checks))
    found = checks + jne_checks + after_checks
    not_found = bytes.fromhex("e9") + struct.pack("<i", len(found))     # jmp to the end
    return find + loop + not_found + found


def env_offsets(uc, context) -> EnvOffsets | None:
    """The stub's offsets for this build, found on engine `uc` (see above); `context`: the
    private_state ContextOffsets. None if anything is not where QEMU's layout puts it."""
    import unicorn.x86_const as X

    from .live_cpu_state import _context_bytes, syscall_msr_offsets

    def where(write, value: int) -> int | None:
        before = _context_bytes(uc)
        write(value)
        after = _context_bytes(uc)
        found = [o for o in range(0, len(after) - 7, 8) if struct.unpack_from("<Q", after, o)[0] == value
                 and struct.unpack_from("<Q", before, o)[0] != value]
        return found[0] if len(found) == 1 else None

    msrs = syscall_msr_offsets(uc)
    if msrs is None:
        return None
    kept_regs = {r: uc.reg_read(r) for r in (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_R11,
                                             X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS)}
    try:
        found = {name: where(lambda v, r=register: uc.reg_write(r, v), _MARKER + i)
                 for i, (name, register) in enumerate((("rax", X.UC_X86_REG_RAX), ("rcx", X.UC_X86_REG_RCX),
                                                       ("r11", X.UC_X86_REG_R11), ("eip", X.UC_X86_REG_RIP)))}
        at = {name: offset for name, offset in found.items() if offset is not None}
        if len(at) != len(found):
            return None
        env = at["rax"]
        # EFLAGS, CC_DST/SRC/SRC2, CC_OP, DF lie between eip and hflags, as in QEMU's CPUX86State
        eip, hflags = at["eip"] - env, context.hflags - env
        if hflags - eip != 0x30:
            return None
        off = EnvOffsets(rcx=at["rcx"] - env, r11=at["r11"] - env, eip=eip, eflags=eip + 8,
                         cc_dst=eip + 0x10, cc_src=eip + 0x18, cc_src2=eip + 0x20, cc_op=eip + 0x28,
                         df=eip + 0x2C, hflags=hflags, segments=context.segments - env,
                         old_exception=context.old_exception - env, efer=msrs[MSR_EFER] - env,
                         star=msrs[MSR_STAR] - env, lstar=msrs[MSR_LSTAR] - env, fmask=msrs[MSR_FMASK] - env)
        # The API loads RFLAGS as QEMU does: whole in EFLAGS (between slices; the CPU loop moves
        # the arithmetic flags and DF out while it runs), the arithmetic flags in CC_SRC, DF as -1
        uc.reg_write(X.UC_X86_REG_RFLAGS, 0x40C03)  # AC OF DF CF
        raw = _context_bytes(uc)

        def field(offset: int, fmt: str) -> int:
            return struct.unpack_from(fmt, raw, env + offset)[0]

        if (field(off.eflags, "<Q") & ~0x200, field(off.cc_src, "<Q"), field(off.cc_op, "<I"), field(off.df, "<i")) \
                != (0x40C03, 0x801, CC_OP_EFLAGS, -1) or off.rcx != 8 or off.r11 != 0x58:
            return None
        return off
    finally:
        for register, value in kept_regs.items():
            uc.reg_write(register, value)


def attach(uc, context, live: int | None) -> "NativeSyscalls | None":
    """SYSCALL in machine code for engine `uc` (`context`: private_state's ContextOffsets;
    `live`: live_cpu_state's live base); None where it stays in Python."""
    if live is None or not install(context):
        return None
    env = env_address(uc, live)
    return NativeSyscalls.attach(env) if env is not None else None


def install(context) -> bool:
    """Put the stub in front of helper_syscall for this process (once); False where this
    libunicorn is not the build it knows or the check failed (SYSCALL stays in Python)."""
    global _installed
    with _lock:
        if _installed is None:
            _installed = _install(context)
    return _installed


def _install(context) -> bool:
    from unicorn.unicorn_py3.unicorn import uclib

    from .private_state import SEGMENT_CACHE_SIZE, SYSCALL_CS_FLAGS, SYSCALL_SS_FLAGS, _probe_uc

    uc = _probe_uc()  # (the check runs its guest on it too)
    offsets = env_offsets(uc, context)
    if offsets is None:
        log.info("software CPU: the engine's SYSCALL state is not laid out as pyvmm knows: SYSCALL runs in Python")
        return False
    try:
        compute = ctypes.cast(getattr(uclib, CC_COMPUTE_ALL), ctypes.c_void_p).value
    except AttributeError:
        log.info("software CPU: libunicorn exports no %s: SYSCALL runs in Python", CC_COMPUTE_ALL)
        return False
    assert compute is not None
    code = stub(offsets, ctypes.addressof(_table), compute, SYSCALL_CS_FLAGS, SYSCALL_SS_FLAGS, SEGMENT_CACHE_SIZE)
    if not helper_patch.prepend(HELPER, PROLOGUE, code):
        return False
    problem = _check(context, uc)
    if problem is not None:
        helper_patch.restore(HELPER)
        log.warning("software CPU: SYSCALL in machine code failed its check (%s): SYSCALL runs in Python", problem)
        return False
    return True


class NativeSyscalls:
    """One engine's entry in the stub's table; `count` is the SYSCALLs the stub did for it."""

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry
        self._release = weakref.finalize(self, _free, entry)  # runs once: at close() or collection

    @property
    def count(self) -> int:
        return self._entry.count

    def close(self) -> None:
        """The engine is going: its entry is free for another (its env may be reused)."""
        self._release()

    @classmethod
    def attach(cls, env: int) -> "NativeSyscalls | None":
        """Register the engine whose CPUX86State is at `env`; None if the table is full."""
        with _lock:
            for entry in _table:
                if entry.env == 0:
                    entry.count, entry.env = 0, env
                    return cls(entry)
        log.info("software CPU: %d engines already do SYSCALL in machine code: this one uses Python", TABLE_SIZE)
        return None


def _free(entry: _Entry) -> None:
    with _lock:
        entry.env = 0


def env_address(uc, live_base: int) -> int | None:
    """The address of the CPUX86State of engine `uc`, given live_cpu_state's live base."""
    import unicorn.x86_const as X

    from .live_cpu_state import _context_bytes

    kept = uc.reg_read(X.UC_X86_REG_RAX)
    try:
        uc.reg_write(X.UC_X86_REG_RAX, _MARKER)
        raw = _context_bytes(uc)
        marker = struct.pack("<Q", _MARKER)
        if raw.count(marker) != 1:
            return None
        return live_base + raw.index(marker)
    finally:
        uc.reg_write(X.UC_X86_REG_RAX, kept)


# --- the check ----------------------------------------------------------------------------

_STAR_CS = 0x08          # the probe guest's 64-bit kernel code segment (SS 0x10 follows it)
_ENTER_USER = 0x10700    # CPL 0: an IRETQ frame to CPL 3 at the SYSCALL
_SYSCALL_AT = 0x10800
_TARGET = 0x11000        # LSTAR: a HLT
_CASES = (  # (RFLAGS at CPL 3, FMASK)
    (0x0000_0ED7, 0x0004_7700),   # OF DF IF SF ZF AF PF CF; Linux's mask without the arithmetic flags
    (0x0004_0A93, 0x0000_0C01),   # AC OF IF SF AF CF; mask OF DF CF
)


_RFLAGS_AT = 0x10780     # the RFLAGS the IRETQ loads (data: the engine does not see code rewritten by the API)
_ENTER_USER_CODE = (bytes.fromhex("6a1b" "6800f00100" "ff3425") + struct.pack("<I", _RFLAGS_AT)  # SS, RSP, RFLAGS
                    + bytes.fromhex("6a23" "68") + struct.pack("<I", _SYSCALL_AT) + bytes.fromhex("48cf"))  # CS, RIP


def _check(context, uc=None) -> str | None:
    """A scratch guest (private_state's probe engine, or `uc`, one) makes SYSCALLs from CPL 3
    through the stub; None if each ends as the SDM says."""
    import unicorn as U
    import unicorn.x86_const as X

    from .engine_state import EngineControl, engine_offsets
    from .live_cpu_state import live_context_base
    from .private_state import PrivateState, SYSCALL_CS_FLAGS, SYSCALL_SS_FLAGS, _probe_uc

    uc = _probe_uc() if uc is None else uc
    live = live_context_base(uc, EngineControl(uc, engine_offsets()).cpu_address)
    env = env_address(uc, live) if live is not None else None
    if env is None:
        return "the engine's CPU state was not found"
    native = NativeSyscalls.attach(env)
    if native is None:
        return None  # (a full table: nothing to check, and nothing uses the stub)
    try:
        uc.mem_write(_ENTER_USER, _ENTER_USER_CODE)
        uc.mem_write(_SYSCALL_AT, bytes.fromhex("0f05"))   # syscall
        uc.mem_write(_TARGET, bytes.fromhex("f4"))         # hlt
        uc.msr_write(MSR_EFER, 0x501)
        uc.msr_write(MSR_STAR, _STAR_CS << 32 | 0x1B << 48)
        uc.msr_write(MSR_LSTAR, _TARGET)
        private = PrivateState(uc, context)
        for done, (rflags, fmask) in enumerate(_CASES, 1):
            uc.mem_write(_RFLAGS_AT, struct.pack("<Q", rflags))
            uc.msr_write(MSR_FMASK, fmask)
            try:
                uc.emu_start(_ENTER_USER, _TARGET + 1)
            except U.UcError as exc:
                return f"RFLAGS {rflags:#x}, FMASK {fmask:#x}: the guest stopped at " \
                       f"{uc.reg_read(X.UC_X86_REG_RIP):#x} ({exc})"
            segments = private.read_segments()
            got = (uc.reg_read(X.UC_X86_REG_RCX), uc.reg_read(X.UC_X86_REG_R11), uc.reg_read(X.UC_X86_REG_RFLAGS),
                   segments["cs"], segments["ss"], private.hflags() & HF_CPL_MASK, native.count)
            want = (_SYSCALL_AT + 2, rflags, rflags & ~fmask & ~RFLAGS_RF | 2,
                    (_STAR_CS, 0, 0xFFFFFFFF, SYSCALL_CS_FLAGS), (_STAR_CS + 8, 0, 0xFFFFFFFF, SYSCALL_SS_FLAGS), 0,
                    done)
            if got != want:
                return f"RFLAGS {rflags:#x}, FMASK {fmask:#x}: got {got}, expected {want}"
        return None
    finally:
        native.close()
