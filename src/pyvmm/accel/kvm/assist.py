"""Finish instructions a software-assisted KVM fails to emulate (KVM_EXIT_INTERNAL_ERROR).

On a nested KVM that emulates guest kernel code (kvm_pvm; ENVIRONMENT.md), some
instructions end in an emulation failure. Where the architectural result is
well defined and small, pyvmm completes the instruction itself and lets the
guest go on: int3, int n, into (the exception or interrupt they raise is
injected), wait (a no-op with no x87 exception pending), clac/stac, popcnt
(register and memory operands) and verw (the segment check; its side effect
on CPU buffers is microarchitectural). Anything else stops the VM with the
instruction named (`name_instruction`). On a host with VT-x/AMD-V none of
this triggers.

What pyvmm measured failing at CPL0 on kvm_pvm, beyond those (tiny guests, one
instruction each): cmpxchg16b, the XSAVE family (xgetbv, xsave, xrstor,
xsaveopt, xsavec), rdtscp, x87 arithmetic and fnstsw/fldcw, every SSE
instruction but plain moves (pxor, paddd, movd/movq to and from GPRs, ldmxcsr,
crc32, pshufb, ptest, aesenc, pclmulqdq, sha1rnds4, gf2p8mulb, ...), VEX
encodings (AVX, BMI1/2), adcx, clwb, xtest, monitor, movdiri, movdir64b,
invpcid; movbe, rdpid and xbegin raise #UD. Those have no small complete
emulation here (several need the guest's FPU/vector state, cmpxchg16b must be
atomic against the other vCPUs): the KVM backend hides their CPUID features
on such a host instead (cpuid.EMULATED_KERNEL_HIDDEN).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ...errors import PyvmmError
from ...arch.x86_64 import paging
from ...arch.x86_64.decode import GPR_ENCODING, DecodeError, Instruction, MemoryOperand, decode_modrm

log = logging.getLogger(__name__)

RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_OF = 1 << 11
RFLAGS_AC = 1 << 18
RFLAGS_VM = 1 << 17
ARITHMETIC_FLAGS = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF

VECTOR_BREAKPOINT = 3
VECTOR_OVERFLOW = 4
VECTOR_INVALID_OPCODE = 6
VECTOR_STACK_FAULT = 12
VECTOR_GENERAL_PROTECTION = 13
VECTOR_PAGE_FAULT = 14

CR0_PE = 1 << 0
CR4_LA57 = 1 << 12
CR4_SMAP = 1 << 21
EFER_LMA = 1 << 10


@dataclass(frozen=True)
class Assist:
    name: str          # what the guest executed
    length: int        # bytes to skip; 0 when the instruction faults instead of completing
    inject: int | None = None       # exception/interrupt vector to raise after the instruction
    software: bool = False          # INT n (an interrupt with the soft flag) rather than an exception
    error_code: int | None = None   # pushed with the injected exception
    cr2: int | None = None          # the faulting address of an injected #PF
    rflags_set: int = 0
    rflags_clear: int = 0
    registers: tuple[tuple[str, int], ...] = ()   # (kvm_regs field, new value)


class AssistError(PyvmmError):
    """pyvmm knows the instruction but cannot complete it here (the message says why)."""


class GuestFault(PyvmmError):
    """The instruction raises an exception instead of completing."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        super().__init__(f"vector {vector}")
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


class GuestView:
    """The guest state an assist reads: registers, and memory through segmentation and paging
    as the instruction itself would see it (supervisor accesses, SMAP honoured)."""

    def __init__(self, regs, sregs, memory) -> None:
        self.regs, self.sregs, self.memory = regs, sregs, memory

    @property
    def rflags(self) -> int:
        return self.regs.rflags

    @property
    def protected(self) -> bool:
        return bool(self.sregs.cr0 & CR0_PE) and not self.regs.rflags & RFLAGS_VM

    @property
    def code_size(self) -> int:
        cs = self.sregs.cs
        if self.sregs.efer & EFER_LMA and cs.l:
            return 64
        return 32 if cs.db and self.sregs.cr0 & CR0_PE else 16

    @property
    def cpl(self) -> int:
        if not self.sregs.cr0 & CR0_PE:
            return 0
        if self.regs.rflags & RFLAGS_VM:
            return 3
        return self.sregs.ss.dpl  # KVM's definition of the CPL

    def gpr(self, number: int) -> int:
        return getattr(self.regs, GPR_ENCODING[number])

    def read_operand(self, operand: MemoryOperand, size: int, next_rip: int) -> bytes:
        return self.read_linear(self.linear_address(operand, size, next_rip), size)

    def linear_address(self, operand: MemoryOperand, size: int, next_rip: int) -> int:
        """Segmentation: the linear address of a memory operand, or GuestFault (#GP/#SS)."""
        offset = operand.offset(self.gpr, next_rip)
        stack = operand.segment == "ss"
        fault = VECTOR_STACK_FAULT if stack else VECTOR_GENERAL_PROTECTION
        if self.code_size == 64:
            base = getattr(self.sregs, operand.segment).base if operand.segment in ("fs", "gs") else 0
            linear = (base + offset) & (1 << 64) - 1
            if self.sregs.cr4 & CR4_LA57:
                raise AssistError("5-level paging is not supported by pyvmm's page walker")
            for address in (linear, (linear + size - 1) & (1 << 64) - 1):
                if not _canonical(address):
                    raise GuestFault(fault, 0)
            return linear
        segment = getattr(self.sregs, operand.segment)
        if self.protected and (segment.unusable or not segment.present):
            raise GuestFault(fault, 0)
        last = offset + size - 1
        if segment.s and segment.type & 0b1100 == 0b0100:  # expand-down data segment
            upper = 0xFFFFFFFF if segment.db else 0xFFFF
            if offset <= segment.limit or last > upper:
                raise GuestFault(fault, 0)
        elif last > segment.limit:
            raise GuestFault(fault, 0)
        return (segment.base + offset) & 0xFFFFFFFF

    def read_linear(self, linear: int, size: int, *, implicit: bool = False) -> bytes:
        """Read through the guest's page tables; a failed walk becomes the #PF the CPU raises.
        `implicit`: a supervisor access the CPU makes on its own (descriptor tables)."""
        mode = paging.PagingMode(self.sregs.cr0, self.sregs.cr3, self.sregs.cr4, self.sregs.efer)
        user = self.cpl == 3 and not implicit
        out = bytearray()
        while size:
            try:
                t = paging.translate(self.memory, mode, linear, user=user)
            except paging.PageFault as fault:
                raise GuestFault(VECTOR_PAGE_FAULT, fault.error_code, cr2=fault.linear) from None
            except NotImplementedError as exc:
                raise AssistError(str(exc)) from None
            if (mode.enabled and t.user and not user and self.sregs.cr4 & CR4_SMAP
                    and (implicit or not self.regs.rflags & RFLAGS_AC)):
                raise GuestFault(VECTOR_PAGE_FAULT, paging.PF_PRESENT, cr2=linear)  # SMAP
            chunk = min(size, t.page_size - (linear & (t.page_size - 1)))
            try:
                out += self.memory.read(t.physical, chunk)
            except Exception:
                raise AssistError(f"its operand at {linear:#x} (guest-physical {t.physical:#x}) is not RAM") from None
            linear, size = linear + chunk, size - chunk
        return bytes(out)


def _canonical(address: int) -> bool:
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


def decode(code: bytes, cpu: GuestView) -> Assist | None:
    """The assist for the instruction starting at `code`, None if pyvmm does not handle it.
    Raises AssistError for an instruction pyvmm handles but cannot complete here."""
    if not code:
        return None
    op = code[0]
    if op == 0xCC:
        return Assist("int3", 1, inject=VECTOR_BREAKPOINT)
    if op == 0xCD and len(code) > 1:
        vector = code[1]
        return Assist(f"int {vector:#x}", 2, inject=vector, software=vector >= 32)
    if op == 0xCE:
        if cpu.code_size == 64:  # not an instruction in 64-bit mode
            return Assist("into", 0, inject=VECTOR_INVALID_OPCODE)
        return Assist("into", 1, inject=VECTOR_OVERFLOW if cpu.rflags & RFLAGS_OF else None)
    if op == 0x9B:
        return Assist("wait", 1)  # no x87 exceptions pending in a fresh kernel: a no-op
    if code[:3] == b"\x0f\x01\xca":
        return Assist("clac", 3, rflags_clear=RFLAGS_AC)
    if code[:3] == b"\x0f\x01\xcb":
        return Assist("stac", 3, rflags_set=RFLAGS_AC)
    try:
        insn = decode_modrm(code, cpu.code_size)
    except DecodeError:
        return None
    if insn.opcode == b"\x0f\xb8" and insn.rep and not insn.repne:
        return _completed("popcnt", insn, cpu, _popcnt)
    if insn.opcode == b"\x0f\x00" and insn.reg & 7 == 5:
        return _completed("verw", insn, cpu, _verw)
    return None


def _completed(name: str, insn: Instruction, cpu: GuestView, execute) -> Assist:
    """Run `execute(insn, cpu, next_rip)`; an exception it raises becomes the injected fault."""
    try:
        if insn.lock:
            raise GuestFault(VECTOR_INVALID_OPCODE)
        registers, rflags_set, rflags_clear = execute(insn, cpu, cpu.regs.rip + insn.length)
    except GuestFault as fault:
        return Assist(name, 0, inject=fault.vector, error_code=fault.error_code, cr2=fault.cr2)
    return Assist(name, insn.length, rflags_set=rflags_set, rflags_clear=rflags_clear, registers=registers)


def _popcnt(insn: Instruction, cpu: GuestView, next_rip: int):
    """POPCNT r, r/m (F3 [REX] 0F B8 /r): ZF = (source == 0); CF, OF, SF, AF, PF cleared."""
    size = insn.operand_size
    mask = (1 << size) - 1
    if insn.memory is None:
        source = cpu.gpr(insn.rm) & mask
    else:
        source = int.from_bytes(cpu.read_operand(insn.memory, size // 8, next_rip), "little")
    count = bin(source).count("1")
    name = GPR_ENCODING[insn.reg]
    if size == 16:  # a 16-bit destination keeps bits 16-63
        count |= cpu.gpr(insn.reg) & ~0xFFFF & (1 << 64) - 1
    zero = RFLAGS_ZF if source == 0 else 0
    return ((name, count),), zero, ARITHMETIC_FLAGS & ~zero


def _verw(insn: Instruction, cpu: GuestView, next_rip: int):
    """VERW r/m16 (0F 00 /5): ZF = the selector names a data segment writable at CPL and RPL."""
    if not cpu.protected:
        raise GuestFault(VECTOR_INVALID_OPCODE)
    if insn.memory is None:
        selector = cpu.gpr(insn.rm) & 0xFFFF
    else:
        selector = int.from_bytes(cpu.read_operand(insn.memory, 2, next_rip), "little")
    writable = _selector_writable(cpu, selector)
    return (), RFLAGS_ZF if writable else 0, 0 if writable else RFLAGS_ZF


def _selector_writable(cpu: GuestView, selector: int) -> bool:
    if selector & 0xFFFC == 0:  # null selector (TI=0, index 0)
        return False
    if selector & 4:  # TI: the LDT
        ldt = cpu.sregs.ldt
        if ldt.unusable or not ldt.present or ldt.selector & 0xFFFC == 0:
            return False
        base, limit = ldt.base, ldt.limit
    else:
        base, limit = cpu.sregs.gdt.base, cpu.sregs.gdt.limit
    offset = selector & 0xFFF8
    if offset + 7 > limit:
        return False
    descriptor = int.from_bytes(cpu.read_linear(base + offset, 8, implicit=True), "little")
    code_or_data = descriptor >> 44 & 1
    type_ = descriptor >> 40 & 0xF
    dpl = descriptor >> 45 & 3
    if not code_or_data or type_ & 0b1000:  # system segment or gate; code is never writable
        return False
    if not type_ & 0b0010:
        return False
    return dpl >= cpu.cpl and dpl >= selector & 3


def apply(vcpu_fd, assist: Assist) -> None:
    """Write the results, advance RIP past the instruction, inject what it raises."""
    regs = vcpu_fd.get_regs()
    for name, value in assist.registers:
        setattr(regs, name, value)
    regs.rip += assist.length
    regs.rflags = (regs.rflags | assist.rflags_set) & ~assist.rflags_clear
    vcpu_fd.set_regs(regs)
    if assist.inject is None:
        return
    if assist.cr2 is not None:
        sregs = vcpu_fd.get_sregs()
        sregs.cr2 = assist.cr2
        vcpu_fd.set_sregs(sregs)
    events = vcpu_fd.get_vcpu_events()
    if assist.software:
        events.interrupt.injected, events.interrupt.nr, events.interrupt.soft = 1, assist.inject, 1
    else:
        # `injected`, not `pending`: KVM drops a pending exception unless the exception-payload
        # capability is enabled (ENVIRONMENT.md).
        events.exception.injected, events.exception.nr = 1, assist.inject
        events.exception.has_error_code = int(assist.error_code is not None)
        events.exception.error_code = assist.error_code or 0
    vcpu_fd.set_vcpu_events(events)


# --- naming what could not be completed ------------------------------------------------------

_FIXED = {
    b"\x0f\x01\xd0": "xgetbv", b"\x0f\x01\xd1": "xsetbv", b"\x0f\x01\xf9": "rdtscp",
    b"\x0f\x01\xc8": "monitor", b"\x0f\x01\xc9": "mwait", b"\x0f\x01\xd6": "xtest",
    b"\x0f\x01\xd5": "xend", b"\x0f\x01\xe8": "serialize",
}
# (opcode, ModRM.reg) -> name, memory forms only (ModRM.mod != 3)
_GROUPS = {
    (b"\x0f\xae", 0): "fxsave", (b"\x0f\xae", 1): "fxrstor", (b"\x0f\xae", 2): "ldmxcsr",
    (b"\x0f\xae", 3): "stmxcsr", (b"\x0f\xae", 4): "xsave", (b"\x0f\xae", 5): "xrstor",
    (b"\x0f\xae", 6): "xsaveopt", (b"\x0f\xae", 7): "clflush",
    (b"\x0f\xc7", 1): "cmpxchg8b", (b"\x0f\xc7", 3): "xrstors", (b"\x0f\xc7", 4): "xsavec",
    (b"\x0f\xc7", 5): "xsaves", (b"\x0f\x00", 4): "verr", (b"\x0f\x00", 5): "verw",
}
XSAVE_FAMILY = frozenset({"xgetbv", "xsetbv", "xsave", "xrstor", "xsaveopt", "xsavec", "xsaves", "xrstors",
                          "xsave64", "xrstor64", "xsaveopt64", "xsavec64", "xsaves64", "xrstors64"})


def name_instruction(code: bytes, code_size: int = 64) -> tuple[str, int | None]:
    """A name for the instruction at `code` fit for an error line, and its length when known:
    the instructions measured failing on kvm_pvm by name, others by their class."""
    if not code:
        return "an unreadable instruction", None
    for pattern, name in _FIXED.items():
        if _strip_prefixes(code, code_size).startswith(pattern):
            return name, len(code) - len(_strip_prefixes(code, code_size)) + len(pattern)
    try:
        insn = decode_modrm(code, code_size)
    except DecodeError:
        insn = None
    if insn is not None:
        key = (insn.opcode, insn.reg & 7)
        if insn.mod != 3 and key in _GROUPS:
            name = _GROUPS[key]
            if name == "xsaveopt" and insn.operand_size_prefix:
                name = "clwb"
            elif name == "cmpxchg8b" and insn.rex & 8:
                name = "cmpxchg16b"
            elif name.startswith("x") and insn.rex & 8:
                name += "64"
            return ("lock " if insn.lock else "") + name, insn.length
        if insn.opcode == b"\x0f\xb8" and insn.rep:
            return "popcnt", insn.length
    body = _strip_prefixes(code, code_size)
    if code_size == 64 and body[:1] in (b"\xc4", b"\xc5"):
        return "a VEX-encoded (AVX/BMI) instruction", None
    if body[:1] and 0xD8 <= body[0] <= 0xDF:
        return "an x87 instruction", None
    if body[:2] in (b"\x0f\x38", b"\x0f\x3a"):
        return "an SSSE3/SSE4/AES/SHA instruction", None
    if body[:1] == b"\x0f" and len(body) > 1 and (0x50 <= body[1] <= 0x7F or 0xC2 <= body[1] <= 0xC6
                                                    or 0xD0 <= body[1] <= 0xFF):
        return "an MMX/SSE instruction", None
    return "an instruction", None


def _strip_prefixes(code: bytes, code_size: int) -> bytes:
    pos = 0
    while pos < len(code) and pos < 14 and (code[pos] in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3)
                                            or code_size == 64 and 0x40 <= code[pos] <= 0x4F):
        pos += 1
    return code[pos:]


def hint(name: str) -> str:
    """What a user can do about an instruction this KVM cannot run, '' if nothing specific."""
    if name.removeprefix("lock ") in XSAVE_FAMILY:
        return ("this KVM shows the guest the host's XSAVE whatever CPUID pyvmm sets; "
                "boot Linux with noxsave")
    return ""
