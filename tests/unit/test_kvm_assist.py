"""Which instructions pyvmm completes for a KVM that failed to emulate them, and how.

The expected results come from the Intel SDM (POPCNT, VERR/VERW, ch. 4.6 SMAP, ch. 6
exceptions), computed here independently of the code under test, on guest state built by
hand: long-mode page tables, a GDT, registers.
"""

from __future__ import annotations

import random

import pytest

from pyvmm.accel.kvm.assist import (
    RFLAGS_AC, RFLAGS_AF, RFLAGS_CF, RFLAGS_OF, RFLAGS_PF, RFLAGS_SF, RFLAGS_ZF, AssistError, GuestView, apply,
    decode, hint, name_instruction,
)
from pyvmm.arch.x86_64 import layout
from pyvmm.kvm import uapi
from pyvmm.kvm.exits import InternalError
from pyvmm.memory import GuestMemory

ARITH = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF
P, RW, US, PS = 1, 2, 4, 0x80
PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
USER_PAGE, MISSING_PAGE = 0x100000, 0x101000
GDT = 0x8000
CR0_PE, CR0_PG, CR4_PAE, CR4_SMAP, EFER_LME, EFER_LMA = 1, 1 << 31, 1 << 5, 1 << 21, 1 << 8, 1 << 10


def descriptor(type_: int, dpl: int, s: int = 1, base: int = 0, limit: int = 0xFFFFF, l: int = 0) -> int:
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | type_ << 40 | s << 44 | dpl << 45 | 1 << 47
            | (limit >> 16 & 0xF) << 48 | l << 53 | 1 << 55 | (base >> 24 & 0xFF) << 56)


GDT_ENTRIES = [
    0,                               # 0x00 null
    descriptor(0xB, 0, l=1),         # 0x08 code, execute/read, DPL0
    descriptor(0x3, 0),              # 0x10 data, read/write, DPL0
    descriptor(0x1, 0),              # 0x18 data, read-only, DPL0
    descriptor(0x3, 3),              # 0x20 data, read/write, DPL3
    descriptor(0x9, 0, s=0),         # 0x28 system: available 64-bit TSS
    descriptor(0xF, 0),              # 0x30 code, conforming, execute/read
    descriptor(0x7, 1),              # 0x38 data, read/write, expand-down, DPL1
]
LDT = 0x9000                         # one entry: a DPL0 read/write data segment


@pytest.fixture(scope="module")
def memory():
    with GuestMemory.from_specs(layout.ram_regions(8 << 20)) as mem:
        mem.write_u64(PML4, PDPT | P | RW | US)                       # U/S decided by the last level
        mem.write_u64(PDPT, PD | P | RW | US)
        mem.write_u64(PD, PT | P | RW | US)                           # 0-2 MiB: 4 KiB pages
        for page in range(512):
            address = page << 12
            if address == MISSING_PAGE:
                continue
            mem.write_u64(PT + page * 8, address | P | RW | (US if address == USER_PAGE else 0))
        mem.write_u64(PD + 8, 0x200000 | P | RW | PS)                 # 2-4 MiB: one 2 MiB page
        for i, entry in enumerate(GDT_ENTRIES):
            mem.write_u64(GDT + 8 * i, entry)
        mem.write_u64(LDT, descriptor(0x3, 0))
        yield mem


def long_mode_sregs(**overrides) -> uapi.kvm_sregs:
    sregs = uapi.kvm_sregs()
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = CR0_PE | CR0_PG, PML4, CR4_PAE, EFER_LME | EFER_LMA
    sregs.cs.l, sregs.cs.selector, sregs.cs.present, sregs.cs.s, sregs.cs.type = 1, 0x08, 1, 1, 0xB
    for name in ("ds", "es", "ss", "fs", "gs"):
        segment = getattr(sregs, name)
        segment.present, segment.s, segment.type, segment.limit, segment.db = 1, 1, 3, 0xFFFFFFFF, 1
    sregs.gdt.base, sregs.gdt.limit = GDT, 8 * len(GDT_ENTRIES) - 1
    sregs.ldt.unusable = 1
    for name, value in overrides.items():
        setattr(sregs, name, value)
    return sregs


class Guest:
    """Registers and memory the way a vCPU fd holds them, for GuestView and apply()."""

    def __init__(self, memory, sregs=None, rip=0x1000, rflags=0x2, **gprs) -> None:
        self.memory = memory
        self.regs = uapi.kvm_regs(rip=rip, rflags=rflags, **gprs)
        self.sregs = sregs or long_mode_sregs()
        self.events = uapi.kvm_vcpu_events()

    def view(self) -> GuestView:
        return GuestView(self.regs, self.sregs, self.memory)

    def run(self, code: bytes):
        """decode + apply, as KvmVcpu.assist does; the Assist (or None)."""
        assist = decode(code, self.view())
        if assist is not None:
            apply(self, assist)
        return assist

    # the vCPU fd methods apply() uses
    def get_regs(self):
        return self.regs

    def set_regs(self, regs):
        self.regs = regs

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, sregs):
        self.sregs = sregs

    def get_vcpu_events(self):
        return self.events

    def set_vcpu_events(self, events):
        self.events = events


def injected(guest: Guest):
    e = guest.events.exception
    return (e.injected, e.nr, e.error_code if e.has_error_code else None)


# --- the stateless assists -------------------------------------------------------------------

@pytest.mark.parametrize("code,name,length,inject,software", [
    (b"\xcc", "int3", 1, 3, False),
    (b"\xcd\x80", "int 0x80", 2, 0x80, True),
    (b"\xcd\x0d", "int 0xd", 2, 13, False),     # INT n below 32 is raised as an exception vector
    (b"\x9b", "wait", 1, None, False),
    (b"\x0f\x01\xca", "clac", 3, None, False),
    (b"\x0f\x01\xcb", "stac", 3, None, False),
])
def test_decode(memory, code, name, length, inject, software):
    assist = decode(code + b"\x90" * 4, Guest(memory).view())
    assert (assist.name, assist.length, assist.inject, assist.software) == (name, length, inject, software)


def test_into_raises_only_with_overflow_and_is_invalid_in_64_bit_code(memory):
    protected = long_mode_sregs(efer=0)
    protected.cs.l, protected.cs.db = 0, 1
    assert decode(b"\xce", Guest(memory, protected).view()).inject is None
    assert decode(b"\xce", Guest(memory, protected, rflags=0x2 | RFLAGS_OF).view()).inject == 4
    assist = decode(b"\xce", Guest(memory, rflags=0x2 | RFLAGS_OF).view())
    assert (assist.length, assist.inject) == (0, 6)


def test_unknown_instructions_are_not_assisted(memory):
    view = Guest(memory).view()
    assert decode(b"\x48\x0f\xc7\x0f", view) is None   # cmpxchg16b: no safe completion
    assert decode(b"\x0f\x01\xd0", view) is None       # xgetbv
    assert decode(b"\x0f\xb8\xc3", view) is None       # 0F B8 without F3 is not popcnt
    assert decode(b"\xf2\xf3\x0f\xb8\xc3", view) is None
    assert decode(b"", view) is None


def test_apply_advances_rip_adjusts_flags_and_injects(memory):
    guest = Guest(memory, rflags=0x2 | RFLAGS_AC)
    guest.run(b"\x0f\x01\xca")
    assert guest.regs.rip == 0x1003 and not guest.regs.rflags & RFLAGS_AC
    guest.run(b"\xcc")
    assert guest.regs.rip == 0x1004
    assert injected(guest) == (1, 3, None)
    guest.run(b"\xcd\x80")
    assert (guest.events.interrupt.injected, guest.events.interrupt.nr, guest.events.interrupt.soft) == (1, 0x80, 1)


# --- popcnt ----------------------------------------------------------------------------------

def expected_flags(before: int, source: int) -> int:
    return (before & ~ARITH) | (RFLAGS_ZF if source == 0 else 0)


@pytest.mark.parametrize("seed", range(8))
def test_popcnt_register_forms(memory, seed):
    rng = random.Random(seed)
    for size, code in ((64, "f3480fb8c3"), (32, "f30fb8c3"), (16, "66f30fb8c3")):   # popcnt %rbx/%ebx/%bx -> rax
        source = rng.choice([0, 1 << 63, (1 << 64) - 1, rng.randrange(1 << 64)])
        before = rng.randrange(1 << 64)
        flags = 0x2 | rng.choice([0, ARITH, RFLAGS_ZF | RFLAGS_CF])
        guest = Guest(memory, rflags=flags, rax=before, rbx=source)
        assist = guest.run(bytes.fromhex(code))
        low = source & ((1 << size) - 1)
        count = bin(low).count("1")
        expected = (before & ~0xFFFF | count) if size == 16 else count   # 32-bit results zero-extend
        assert (assist.name, guest.regs.rax, guest.regs.rbx) == ("popcnt", expected, source)
        assert guest.regs.rflags == expected_flags(flags, low)
        assert guest.regs.rip == 0x1000 + len(code) // 2
        assert guest.events.exception.injected == 0


def test_popcnt_extended_registers(memory):
    guest = Guest(memory, r15=0xF0F0, r8=7)
    guest.run(bytes.fromhex("f34d0fb8c7"))   # popcnt %r15, %r8
    assert (guest.regs.r8, guest.regs.r15) == (8, 0xF0F0)


def test_popcnt_zero_source_sets_only_zf(memory):
    guest = Guest(memory, rflags=0x2 | RFLAGS_CF | RFLAGS_SF | RFLAGS_OF, rax=5, rbx=0)
    guest.run(bytes.fromhex("f3480fb8c3"))
    assert guest.regs.rflags == 0x2 | RFLAGS_ZF and guest.regs.rax == 0


def test_popcnt_memory_operands(memory):
    memory.write_u64(0x5000, 0xFFFF_0000_0000_0001)
    memory.write_u64(0x5008, 0x3)
    # popcnt 8(%rdi,%rax,8), %rcx with rdi = 0x5000, rax = 0: the qword at 0x5008
    guest = Guest(memory, rdi=0x5000, rax=0)
    guest.run(bytes.fromhex("f3480fb84cc708"))
    assert guest.regs.rcx == 2 and guest.regs.rip == 0x1007
    # RIP-relative: popcnt 0x3ffc(%rip), %ecx at rip 0x1000, 8 bytes long -> the dword at 0x5004
    guest = Guest(memory, rcx=1 << 40)
    guest.run(bytes.fromhex("f30fb80dfc3f0000"))
    assert guest.regs.rcx == 16
    # 16-bit memory operand: popcnt (%rdi), %ax keeps RAX's upper bits
    guest = Guest(memory, rdi=0x5006, rax=0x1234_5678_9ABC_DEF0)
    guest.run(bytes.fromhex("66f30fb807"))
    assert guest.regs.rax == 0x1234_5678_9ABC_0000 | 16


def test_popcnt_fs_override_uses_the_fs_base(memory):
    memory.write_u64(0x6010, 0xFF)
    sregs = long_mode_sregs()
    sregs.fs.base = 0x6000
    guest = Guest(memory, sregs, rbx=0x10)
    guest.run(bytes.fromhex("64f3480fb803"))   # popcnt %fs:(%rbx), %rax
    assert guest.regs.rax == 8
    sregs.ds.base = 0x6000                      # DS's base is ignored in 64-bit mode
    guest = Guest(memory, sregs, rbx=0x6010)
    guest.run(bytes.fromhex("f3480fb803"))
    assert guest.regs.rax == 8


def test_popcnt_operand_across_a_page_boundary(memory):
    memory.write_u64(0x1FFC, 0xFFFF_FFFF_0000_0001)   # 4 bytes in one page, 4 in the next
    guest = Guest(memory, rbx=0x1FFC)
    guest.run(bytes.fromhex("f3480fb803"))
    assert guest.regs.rax == 33


def test_popcnt_page_fault_is_injected_with_cr2_and_rip_left_alone(memory):
    guest = Guest(memory, rbx=MISSING_PAGE + 0x10, rax=77)
    assist = guest.run(bytes.fromhex("f3480fb803"))
    assert assist.length == 0
    assert guest.regs.rip == 0x1000 and guest.regs.rax == 77            # a fault: nothing completed
    assert injected(guest) == (1, 14, 0)                                # read, supervisor, not present
    assert guest.sregs.cr2 == MISSING_PAGE + 0x10
    # straddling into the missing page: CR2 is the first byte that faults
    guest = Guest(memory, rbx=MISSING_PAGE - 4)
    guest.run(bytes.fromhex("f3480fb803"))
    assert injected(guest) == (1, 14, 0) and guest.sregs.cr2 == MISSING_PAGE


def test_popcnt_smap(memory):
    memory.write_u64(USER_PAGE, 0xF)
    code = bytes.fromhex("f3480fb803")
    guest = Guest(memory, long_mode_sregs(cr4=CR4_PAE | CR4_SMAP), rbx=USER_PAGE)
    guest.run(code)
    assert injected(guest) == (1, 14, 1) and guest.sregs.cr2 == USER_PAGE   # protection violation, read
    guest = Guest(memory, long_mode_sregs(cr4=CR4_PAE | CR4_SMAP), rflags=0x2 | RFLAGS_AC, rbx=USER_PAGE)
    guest.run(code)                                                            # stac'd: allowed
    assert guest.regs.rax == 4 and guest.events.exception.injected == 0
    guest = Guest(memory, rbx=USER_PAGE)                                       # no SMAP: allowed
    guest.run(code)
    assert guest.regs.rax == 4


@pytest.mark.parametrize("code,register,vector", [
    ("f3480fb803", "rbx", 13),     # popcnt (%rbx): #GP(0)
    ("f3480fb80424", "rsp", 12),   # popcnt (%rsp): a stack reference, #SS(0)
])
def test_popcnt_non_canonical_address(memory, code, register, vector):
    guest = Guest(memory, **{register: 0x0000_8000_0000_0000})
    guest.run(bytes.fromhex(code))
    assert injected(guest) == (1, vector, 0) and guest.regs.rip == 0x1000


def test_popcnt_with_lock_is_invalid(memory):
    guest = Guest(memory)
    guest.run(bytes.fromhex("f0f3480fb8c3"))
    assert injected(guest) == (1, 6, None) and guest.regs.rip == 0x1000


def protected_mode(**segments):
    sregs = long_mode_sregs(cr0=CR0_PE, cr4=0, efer=0)
    sregs.cs.l, sregs.cs.db = 0, 1
    for name, (base, limit) in segments.items():
        getattr(sregs, name).base, getattr(sregs, name).limit = base, limit
    return sregs


def test_popcnt_in_32_bit_protected_mode_applies_segment_base_and_limit(memory):
    memory.write_u32(0x7004, 0x7)
    guest = Guest(memory, protected_mode(ds=(0x7000, 0xFFF)), rbx=4)
    guest.run(bytes.fromhex("f30fb803"))   # popcnt (%ebx), %eax: DS.base + 4
    assert guest.regs.rax == 3 and guest.regs.rip == 0x1004
    guest = Guest(memory, protected_mode(ds=(0x7000, 0xFFF)), rbx=0xFFE)   # the dword passes the limit
    guest.run(bytes.fromhex("f30fb803"))
    assert injected(guest) == (1, 13, 0)
    guest = Guest(memory, protected_mode(ss=(0x7000, 0xFFF)), rbp=0x1000)  # (%ebp) is SS: #SS
    guest.run(bytes.fromhex("f30fb84500"))
    assert injected(guest) == (1, 12, 0)


def test_popcnt_expand_down_segment(memory):
    memory.write_u32(0x7800, 0x1)
    sregs = protected_mode(ds=(0x7000, 0x7FF))
    sregs.ds.type = 0x7                     # data, read/write, expand-down: offsets 0x800-0xFFFFFFFF
    guest = Guest(memory, sregs, rbx=0x800)
    guest.run(bytes.fromhex("f30fb803"))
    assert guest.regs.rax == 1
    guest = Guest(memory, sregs, rbx=0x7FF)
    guest.run(bytes.fromhex("f30fb803"))
    assert injected(guest) == (1, 13, 0)


def test_popcnt_in_16_bit_real_mode(memory):
    memory.write_u16(0x7010 + 0x20, 0x8001)
    sregs = long_mode_sregs(cr0=0, cr4=0, efer=0)
    sregs.cs.l, sregs.cs.db = 0, 0
    sregs.ds.base, sregs.ds.limit = 0x7010, 0xFFFF
    guest = Guest(memory, sregs, rbx=0x20, rax=0xAAAA_0000)
    guest.run(bytes.fromhex("f30fb807"))   # popcnt (%bx), %ax
    assert guest.regs.rax == 0xAAAA_0002 and guest.regs.rip == 0x1004


def test_popcnt_operand_outside_ram_or_pae_paging_is_refused_with_a_reason(memory):
    sregs = long_mode_sregs(cr0=CR0_PE, cr4=0, efer=0)   # paging off: linear = physical
    sregs.cs.l, sregs.cs.db = 0, 1
    with pytest.raises(AssistError, match="not RAM"):
        decode(bytes.fromhex("f30fb803"), Guest(memory, sregs, rbx=0xD0000000).view())
    pae = long_mode_sregs(cr0=CR0_PE | CR0_PG, cr4=CR4_PAE, efer=0)
    pae.cs.l, pae.cs.db = 0, 1
    with pytest.raises(AssistError, match="PAE"):
        decode(bytes.fromhex("f30fb803"), Guest(memory, pae, rbx=0x5000).view())


# --- verw ------------------------------------------------------------------------------------

@pytest.mark.parametrize("selector,writable", [
    (0x10, True),     # read/write data, DPL0
    (0x08, False),    # code: never writable
    (0x18, False),    # read-only data
    (0x20, True),     # DPL3 data from CPL0
    (0x13, False),    # RPL3 > DPL0
    (0x23, True),     # RPL3 on DPL3
    (0x00, False),    # null
    (0x03, False),    # null with an RPL
    (0x28, False),    # system segment (TSS)
    (0x30, False),    # conforming code
    (0x38, True),     # expand-down read/write data, DPL1 >= CPL0
    (0x40, False),    # past the GDT limit
    (0xFFF8, False),
    (0x04, False),    # LDT selector, but the LDT is unusable
])
def test_verw_register_form(memory, selector, writable):
    for flags in (0x2 | RFLAGS_CF, 0x2 | RFLAGS_ZF | RFLAGS_CF):
        guest = Guest(memory, rflags=flags, rax=0xFFFF_0000 | selector)
        assist = guest.run(bytes.fromhex("0f00e8"))   # verw %ax
        assert assist.name == "verw" and guest.regs.rip == 0x1003
        assert guest.regs.rflags == (flags & ~RFLAGS_ZF) | (RFLAGS_ZF if writable else 0)   # only ZF changes


def test_verw_at_cpl3_checks_dpl_against_the_cpl(memory):
    sregs = long_mode_sregs()
    sregs.ss.dpl = sregs.cs.dpl = 3
    for selector, writable in ((0x13, False), (0x23, True)):
        guest = Guest(memory, sregs, rax=selector)
        guest.run(bytes.fromhex("0f00e8"))
        assert bool(guest.regs.rflags & RFLAGS_ZF) == writable


def test_verw_through_the_ldt(memory):
    sregs = long_mode_sregs()
    sregs.ldt.unusable, sregs.ldt.present, sregs.ldt.selector = 0, 1, 0x48
    sregs.ldt.base, sregs.ldt.limit = LDT, 7
    for selector, writable in ((0x04, True), (0x0C, False)):   # entry 0; entry 1 is past the limit
        guest = Guest(memory, sregs, rax=selector)
        guest.run(bytes.fromhex("0f00e8"))
        assert bool(guest.regs.rflags & RFLAGS_ZF) == writable


def test_verw_memory_form_reads_the_selector(memory):
    memory.write_u16(0x5100, 0x10)
    memory.write_u16(0x5102, 0x08)
    for address, writable in ((0x5100, True), (0x5102, False)):
        guest = Guest(memory, rbx=address)
        guest.run(bytes.fromhex("0f002b"))   # verw (%rbx)
        assert bool(guest.regs.rflags & RFLAGS_ZF) == writable and guest.regs.rip == 0x1003
    guest = Guest(memory, rbx=MISSING_PAGE)
    guest.run(bytes.fromhex("0f002b"))
    assert injected(guest) == (1, 14, 0) and guest.sregs.cr2 == MISSING_PAGE


def test_verw_in_real_mode_is_invalid(memory):
    sregs = long_mode_sregs(cr0=0, cr4=0, efer=0)
    sregs.cs.l = 0
    guest = Guest(memory, sregs, rax=0x10)
    guest.run(bytes.fromhex("0f00e8"))
    assert injected(guest) == (1, 6, None)


def test_verr_is_not_assisted(memory):
    assert decode(bytes.fromhex("0f00e0"), Guest(memory).view()) is None   # verr %ax: /4


# --- naming what pyvmm could not complete ------------------------------------------------------

@pytest.mark.parametrize("code,name,length", [
    ("0f01d0", "xgetbv", 3),
    ("0fae2d273a0000", "xrstor", 7),
    ("480fae2d273a0000", "xrstor64", 8),
    ("0fae2546", "an instruction", None),  # xsave with its disp32 cut off: not decodable
    ("0fae253a460000", "xsave", 7),
    ("0fae35083a0000", "xsaveopt", 7),
    ("0fc725e9390000", "xsavec", 7),
    ("f0480fc70f", "lock cmpxchg16b", 5),
    ("480fc70f", "cmpxchg16b", 4),
    ("660fae356a090000", "clwb", 8),
    ("0f01f9", "rdtscp", 3),
    ("0f002d420b0000", "verw", 7),
    ("f3480fb8c3", "popcnt", 5),
    ("d9e8", "an x87 instruction", None),
    ("c5f9efc0", "a VEX-encoded (AVX/BMI) instruction", None),
    ("660fefc0", "an MMX/SSE instruction", None),
    ("660f3800c1", "an SSSE3/SSE4/AES/SHA instruction", None),
    ("90", "an instruction", None),
    ("", "an unreadable instruction", None),
])
def test_name_instruction(code, name, length):
    assert name_instruction(bytes.fromhex(code)) == (name, length)


def test_hints():
    assert "noxsave" in hint("xrstor") and "noxsave" in hint("xgetbv") and "noxsave" in hint("xsaveopt64")
    assert hint("popcnt") == "" and hint("an instruction") == ""


# --- the instruction bytes KVM reports with an emulation failure --------------------------------

def test_internal_error_instruction_bytes():
    # as KVM_RUN returned it on kvm_pvm for `popcnt %rbx, %rax` (flags, size + 15 bytes, exit info)
    data = (0x1, 0x8D4CC3B80F48F30F, 0x2B8000000123D, 0x1000)
    exit_ = InternalError(uapi.KVM_INTERNAL_ERROR_EMULATION, data)
    assert exit_.instruction_bytes == bytes.fromhex("f3480fb8c34c8d3d12000000b80200")
    short = (0x1, 0x0000000000C3B803, 0)   # a size of 3
    assert InternalError(uapi.KVM_INTERNAL_ERROR_EMULATION, short).instruction_bytes == bytes.fromhex("b8c300")
    assert InternalError(uapi.KVM_INTERNAL_ERROR_EMULATION, (0, 1, 2)).instruction_bytes == b""   # no flag
    assert InternalError(uapi.KVM_INTERNAL_ERROR_EMULATION, (1,)).instruction_bytes == b""
    assert InternalError(uapi.KVM_INTERNAL_ERROR_DELIVERY_EV, data).instruction_bytes == b""
