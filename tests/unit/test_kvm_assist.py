"""Which instructions pyvmm completes for a KVM that failed to emulate them, and how."""

from __future__ import annotations

import pytest

from pyvmm.accel.kvm_assist import RFLAGS_AC, RFLAGS_OF, apply, decode
from pyvmm.kvm import uapi


@pytest.mark.parametrize("code,name,length,inject,software", [
    (b"\xcc", "int3", 1, 3, False),
    (b"\xcd\x80", "int 0x80", 2, 0x80, True),
    (b"\xcd\x0d", "int 0xd", 2, 13, False),     # INT n below 32 is raised as an exception vector
    (b"\x9b", "wait", 1, None, False),
    (b"\x0f\x01\xca", "clac", 3, None, False),
])
def test_decode(code, name, length, inject, software):
    assist = decode(code + b"\x90" * 4, rflags=0x2)
    assert (assist.name, assist.length, assist.inject, assist.software) == (name, length, inject, software)


def test_into_raises_only_with_overflow():
    assert decode(b"\xce", rflags=0x2).inject is None
    assert decode(b"\xce", rflags=0x2 | RFLAGS_OF).inject == 4


def test_unknown_instructions_are_not_assisted():
    assert decode(b"\x0f\xc7\x0f", rflags=0) is None   # cmpxchg16b: no safe completion
    assert decode(b"", rflags=0) is None


class FakeVcpu:
    def __init__(self):
        self.regs = uapi.kvm_regs(rip=0x1000, rflags=0x2 | RFLAGS_AC)
        self.events = uapi.kvm_vcpu_events()

    def get_regs(self):
        return self.regs

    def set_regs(self, regs):
        self.regs = regs

    def get_vcpu_events(self):
        return self.events

    def set_vcpu_events(self, events):
        self.events = events


def test_apply_advances_rip_adjusts_flags_and_injects():
    vcpu = FakeVcpu()
    apply(vcpu, decode(b"\x0f\x01\xca", rflags=vcpu.regs.rflags))
    assert vcpu.regs.rip == 0x1003 and not vcpu.regs.rflags & RFLAGS_AC
    apply(vcpu, decode(b"\xcc", rflags=vcpu.regs.rflags))
    assert vcpu.regs.rip == 0x1004
    assert (vcpu.events.exception.injected, vcpu.events.exception.nr) == (1, 3)
    apply(vcpu, decode(b"\xcd\x80", rflags=vcpu.regs.rflags))
    assert (vcpu.events.interrupt.injected, vcpu.events.interrupt.nr, vcpu.events.interrupt.soft) == (1, 0x80, 1)
