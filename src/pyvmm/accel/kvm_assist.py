"""Finish instructions a software-assisted KVM fails to emulate (KVM_EXIT_INTERNAL_ERROR).

On a nested KVM that emulates guest kernel code (kvm_pvm; ENVIRONMENT.md), some
instructions end in an emulation failure. Where the architectural result is
well defined and small, pyvmm completes the instruction itself and lets the
guest go on; anything else stops the VM with the instruction named. On a host
with VT-x/AMD-V none of this triggers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

RFLAGS_AC = 1 << 18
VECTOR_BREAKPOINT = 3
VECTOR_OVERFLOW = 4
RFLAGS_OF = 1 << 11


@dataclass(frozen=True)
class Assist:
    name: str          # what the guest executed
    length: int        # bytes to skip
    inject: int | None = None       # exception/interrupt vector to raise after the instruction
    software: bool = False          # INT n (an interrupt with the soft flag) rather than an exception
    rflags_set: int = 0
    rflags_clear: int = 0


def decode(code: bytes, rflags: int) -> Assist | None:
    """The assist for the instruction starting at `code`, or None if pyvmm does not handle it."""
    if not code:
        return None
    op = code[0]
    if op == 0xCC:
        return Assist("int3", 1, inject=VECTOR_BREAKPOINT)
    if op == 0xCD and len(code) > 1:
        vector = code[1]
        return Assist(f"int {vector:#x}", 2, inject=vector, software=vector >= 32)
    if op == 0xCE:
        return Assist("into", 1, inject=VECTOR_OVERFLOW if rflags & RFLAGS_OF else None)
    if op == 0x9B:
        return Assist("wait", 1)  # no x87 exceptions pending in a fresh kernel: a no-op
    if code[:3] == b"\x0f\x01\xca":
        return Assist("clac", 3, rflags_clear=RFLAGS_AC)
    if code[:3] == b"\x0f\x01\xcb":
        return Assist("stac", 3, rflags_set=RFLAGS_AC)
    return None


def apply(vcpu_fd, assist: Assist) -> None:
    """Advance RIP past the instruction, adjust RFLAGS, inject what it raises."""
    regs = vcpu_fd.get_regs()
    regs.rip += assist.length
    regs.rflags = (regs.rflags | assist.rflags_set) & ~assist.rflags_clear
    vcpu_fd.set_regs(regs)
    if assist.inject is None:
        return
    events = vcpu_fd.get_vcpu_events()
    if assist.software:
        events.interrupt.injected, events.interrupt.nr, events.interrupt.soft = 1, assist.inject, 1
    else:
        # `injected`, not `pending`: KVM drops a pending exception unless the exception-payload
        # capability is enabled (ENVIRONMENT.md).
        events.exception.injected, events.exception.nr = 1, assist.inject
        events.exception.has_error_code, events.exception.error_code = 0, 0
    vcpu_fd.set_vcpu_events(events)
