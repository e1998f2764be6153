"""Exception and interrupt delivery through the guest's IDT — the part of an x86 CPU
that Unicorn leaves out. Written from the Intel SDM vol. 3, chapter 6.

`deliver(cpu, vector, ...)` performs what the processor does when an event is
taken: read the gate, pick the stack (same privilege, TSS.RSPn on a privilege
change, or an IST slot), push the frame, load CS:RIP from the gate and update
RFLAGS. A fault while doing so becomes a #DF; a fault while delivering a #DF is
a triple fault, reported to the caller as TripleFault.

`cpu` is the vCPU adapter (TcgVcpu): register access, privilege switch, and
linear-memory access through the guest's page tables.
"""

from __future__ import annotations

import struct

from ...errors import PyvmmError
from ...arch.x86_64.paging import PageFault

# Vectors that push an error code.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
DOUBLE_FAULT, GENERAL_PROTECTION, PAGE_FAULT, INVALID_TSS, SEGMENT_NOT_PRESENT, STACK_FAULT = 8, 13, 14, 10, 11, 12
# Contributory exceptions (SDM table 6-5): two in a row make a #DF.
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})

RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM, RFLAGS_AC = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17, 1 << 18
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF  # the same type values for 32-bit and 64-bit gates


class TripleFault(PyvmmError):
    """The CPU shut down: an exception could not be delivered, even as a #DF."""


class _Fault(PyvmmError):
    """A fault raised during delivery (vector, error code)."""

    def __init__(self, vector: int, error_code: int = 0) -> None:
        super().__init__(vector, error_code)
        self.vector, self.error_code = vector, error_code


def deliver(cpu, vector: int, *, error_code: int | None = None, software: bool = False, length: int = 0,
            _depth: int = 0) -> None:
    """Deliver `vector` (RIP must already be the return address); escalate to #DF / triple fault.
    `length`: of the INT n / INT3 / INTO instruction that raised a software interrupt: a fault
    while delivering it saves the INT's own address (a fault), not the return address."""
    try:
        _deliver_once(cpu, vector, error_code, software)
    except _Fault as fault:
        if software and length:
            cpu.rewind_rip(length)
        if vector == DOUBLE_FAULT or _depth >= 3:
            raise TripleFault(f"exception {fault.vector} while delivering exception {vector}") from None
        if _is_double_fault(vector, fault.vector):
            deliver(cpu, DOUBLE_FAULT, error_code=0, _depth=_depth + 1)
        else:  # handled serially: the second exception is delivered instead
            code = fault.error_code if fault.vector in ERROR_CODE_VECTORS else None
            deliver(cpu, fault.vector, error_code=code, _depth=_depth + 1)


def _is_double_fault(first: int, second: int) -> bool:
    if first == DOUBLE_FAULT:
        return False
    if first in CONTRIBUTORY and second in CONTRIBUTORY:
        return True
    return first == PAGE_FAULT and (second in CONTRIBUTORY or second == PAGE_FAULT)


def _deliver_once(cpu, vector: int, error_code: int | None, software: bool) -> None:
    if cpu.long_mode:
        _deliver_64(cpu, vector, error_code, software)
    elif cpu.protected_mode:
        _deliver_32(cpu, vector, error_code, software)
    else:
        _deliver_real(cpu, vector)


def _idt_error(vector: int) -> int:
    return vector * 8 + 2  # IDT bit set: the error code names the gate


def _read_system(cpu, linear: int, size: int) -> bytes:
    try:
        return cpu.read_linear(linear, size)
    except PageFault as pf:
        cpu.set_cr2(pf.linear)
        raise _Fault(PAGE_FAULT, pf.error_code) from None


def _push(cpu, rsp: int, values: list[int], width: int) -> int:
    """Push `values` (first pushed first) below rsp; returns the new rsp."""
    data = b"".join(struct.pack("<Q" if width == 8 else "<I", v & ((1 << (8 * width)) - 1)) for v in reversed(values))
    rsp -= len(data)
    try:
        cpu.write_linear(rsp, data)
    except PageFault as pf:
        cpu.set_cr2(pf.linear)
        raise _Fault(PAGE_FAULT, pf.error_code) from None
    return rsp


def _check_gate(cpu, vector: int, gate: int, software: bool) -> tuple[int, int]:
    """The checks every gate gets (SDM 6.12.1.1); returns (gate type, current CPL).

    Interrupt (0xE) and trap (0xF) gates only, system descriptors (S bit clear); INT n
    needs gate DPL >= CPL; a non-present gate is #NP."""
    gate_type, system_bit, dpl, present = gate >> 40 & 0xF, gate >> 44 & 1, gate >> 45 & 3, gate >> 47 & 1
    if system_bit or gate_type not in (GATE_INTERRUPT, GATE_TRAP):
        raise _Fault(GENERAL_PROTECTION, _idt_error(vector))
    cpl = cpu.cpl
    if software and dpl < cpl:
        raise _Fault(GENERAL_PROTECTION, _idt_error(vector))
    if not present:
        raise _Fault(SEGMENT_NOT_PRESENT, _idt_error(vector))
    return gate_type, cpl


def _code_segment_dpl(cpu, selector: int) -> tuple[int, bool]:
    """DPL and L bit of the code segment a gate names (from the GDT)."""
    if selector & ~3 == 0:
        raise _Fault(GENERAL_PROTECTION, 0)
    base, limit = cpu.gdt
    index = selector & ~7
    if selector & 4 or index + 7 > limit:
        raise _Fault(GENERAL_PROTECTION, selector & ~3)
    descriptor = struct.unpack("<Q", _read_system(cpu, base + index, 8))[0]
    access = descriptor >> 40 & 0xFF
    if access & 0x18 != 0x18:  # not a code segment
        raise _Fault(GENERAL_PROTECTION, selector & ~3)
    if not access & 0x80:
        raise _Fault(SEGMENT_NOT_PRESENT, selector & ~3)
    return access >> 5 & 3, bool(descriptor >> 53 & 1)


def _deliver_64(cpu, vector: int, error_code: int | None, software: bool) -> None:
    idt_base, idt_limit = cpu.idt
    if vector * 16 + 15 > idt_limit:
        raise _Fault(GENERAL_PROTECTION, _idt_error(vector))
    low, high = struct.unpack("<QQ", _read_system(cpu, idt_base + vector * 16, 16))
    gate_type, cpl = _check_gate(cpu, vector, low, software)
    selector = low >> 16 & 0xFFFF
    target = (low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16 | (high & 0xFFFFFFFF) << 32
    ist = low >> 32 & 7
    new_cpl, long_code = _code_segment_dpl(cpu, selector)
    if not long_code or new_cpl > cpl:
        raise _Fault(GENERAL_PROTECTION, selector & ~3)

    old_ss, old_rsp, rflags, old_cs, rip = cpu.ss, cpu.rsp, cpu.rflags, cpu.cs, cpu.rip
    if ist:
        rsp = cpu.tss_read_u64(0x24 + 8 * (ist - 1))
    elif new_cpl < cpl:
        rsp = cpu.tss_read_u64(4 + 8 * new_cpl)
    else:
        rsp = old_rsp
    rsp &= ~0xF  # 64-bit mode aligns the new stack
    frame = [old_ss, old_rsp, rflags, old_cs, rip]
    if error_code is not None:
        frame.append(error_code)
    rsp = _push(cpu, rsp, frame, 8)

    new_rflags = rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gate_type == GATE_INTERRUPT:
        new_rflags &= ~RFLAGS_IF
    new_ss = new_cpl if new_cpl < cpl else None  # a privilege change loads a NULL SS with RPL = CPL
    cpu.enter_handler(selector=selector & ~3 | new_cpl, rip=target, rsp=rsp, rflags=new_rflags,
                      new_cpl=new_cpl, new_ss=new_ss)


def _deliver_32(cpu, vector: int, error_code: int | None, software: bool) -> None:
    idt_base, idt_limit = cpu.idt
    if vector * 8 + 7 > idt_limit:
        raise _Fault(GENERAL_PROTECTION, _idt_error(vector))
    gate = struct.unpack("<Q", _read_system(cpu, idt_base + vector * 8, 8))[0]
    gate_type, cpl = _check_gate(cpu, vector, gate, software)
    selector = gate >> 16 & 0xFFFF
    target = (gate & 0xFFFF) | (gate >> 48 & 0xFFFF) << 16
    new_cpl, _ = _code_segment_dpl(cpu, selector)
    if new_cpl > cpl:
        raise _Fault(GENERAL_PROTECTION, selector & ~3)
    rflags = cpu.rflags
    if rflags & RFLAGS_VM:
        raise TripleFault(f"interrupt delivery from virtual-8086 mode (vector {vector}) is not supported")
    frame = [rflags & 0xFFFFFFFF, cpu.cs, cpu.rip & 0xFFFFFFFF]
    new_ss = None
    if new_cpl < cpl:
        # the inner stack from the 32-bit TSS: ESP0 at offset 4, SS0 at offset 8 (SDM 6.12.1)
        stack = cpu.tss_read_u64(4)
        esp, new_ss = stack & 0xFFFFFFFF, stack >> 32 & 0xFFFF
        _check_inner_stack(cpu, new_ss, new_cpl)
        frame = [cpu.ss, cpu.rsp & 0xFFFFFFFF, *frame]
    else:
        esp = cpu.rsp & 0xFFFFFFFF
    if error_code is not None:
        frame.append(error_code)
    esp = _push(cpu, esp, frame, 4)  # (flat stack segments: base 0, as every guest here has)
    new_rflags = rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gate_type == GATE_INTERRUPT:
        new_rflags &= ~RFLAGS_IF
    cpu.enter_handler(selector=selector & ~3 | new_cpl, rip=target, rsp=esp, rflags=new_rflags, new_cpl=new_cpl,
                      new_ss=new_ss)


def _check_inner_stack(cpu, selector: int, cpl: int) -> None:
    """TSS.SSn must name a present, writable data segment with RPL = DPL = the new CPL: #TS
    otherwise (#SS if only not present)."""
    base, limit = cpu.gdt
    index = selector & ~7
    if index == 0 or selector & 4 or index + 7 > limit or selector & 3 != cpl:
        raise _Fault(INVALID_TSS, selector & ~3)
    access = struct.unpack("<Q", _read_system(cpu, base + index, 8))[0] >> 40 & 0xFF
    if access & 0x1A != 0x12 or access >> 5 & 3 != cpl:  # data (S=1, code=0), writable
        raise _Fault(INVALID_TSS, selector & ~3)
    if not access & 0x80:
        raise _Fault(STACK_FAULT, selector & ~3)


def _deliver_real(cpu, vector: int) -> None:
    """Real mode (SDM vol. 3 20.1.4, vol. 2 INT n): the 4-byte vector at IDTR.base + 4n (#GP
    past IDTR.limit); FLAGS, CS and IP pushed as words on SS:SP; IF, TF and AC cleared; CS:IP
    from the vector, CS.base = CS * 16."""
    idt_base, idt_limit = cpu.idt
    if vector * 4 + 3 > idt_limit:
        raise _Fault(GENERAL_PROTECTION, 0)
    offset, segment = struct.unpack("<HH", _read_system(cpu, idt_base + vector * 4, 4))
    rflags, rsp = cpu.rflags, cpu.rsp
    sp = (rsp - 6) & 0xFFFF
    data = struct.pack("<HHH", cpu.rip & 0xFFFF, cpu.cs & 0xFFFF, rflags & 0xFFFF)
    stack_base = cpu.segment_base("ss")
    try:
        cpu.write_linear(stack_base + sp, data)
    except PageFault as pf:  # (no paging in real mode: only a write outside RAM gets here)
        raise _Fault(STACK_FAULT, 0) from pf
    new_rflags = rflags & ~(RFLAGS_TF | RFLAGS_IF | RFLAGS_AC)
    cpu.enter_handler(selector=segment, rip=offset, rsp=(rsp & ~0xFFFF) | sp, rflags=new_rflags, new_cpl=0,
                      new_ss=None)
