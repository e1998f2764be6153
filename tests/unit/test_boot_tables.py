"""GDT, identity page tables and entry CPU states (arch/x86_64/boot_tables.py, cpu_state.py)."""

import json

import pytest

from pyvmm.arch.x86_64 import boot_tables, layout
from pyvmm.arch.x86_64.cpu_state import (
    CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, GPR_NAMES,
    CpuState, DescriptorTable, Segment,
)
from pyvmm.memory import GuestMemory, MemoryRegion

MiB, GiB = 1 << 20, 1 << 30
ENTRY = 0x100000


@pytest.fixture
def memory():
    m = GuestMemory([MemoryRegion(0, 2 * MiB)])
    yield m
    m.close()


# --- an independent descriptor decoder (Intel SDM vol. 3, 3.4.5) --------------------------


def decode_descriptor(raw: int) -> dict:
    limit = (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16
    base = ((raw >> 16) & 0xFFFFFF) | ((raw >> 56) & 0xFF) << 24
    access = (raw >> 40) & 0xFF
    flags = (raw >> 52) & 0xF
    g = flags >> 3 & 1
    return {
        "base": base,
        "limit": (limit << 12) | 0xFFF if g else limit,
        "type": access & 0xF,
        "s": access >> 4 & 1,
        "dpl": access >> 5 & 3,
        "present": access >> 7 & 1,
        "avl": flags & 1,
        "l": flags >> 1 & 1,
        "db": flags >> 2 & 1,
        "g": g,
    }


def segment_fields(seg: Segment) -> dict:
    return {k: getattr(seg, k) for k in ("base", "limit", "type", "s", "dpl", "present", "avl", "l", "db", "g")}


def test_decoder_on_a_known_descriptor():
    # The classic flat 32-bit code descriptor: base 0, limit 0xfffff pages, 0x9a access, 0xc flags.
    d = decode_descriptor(0x00CF9A000000FFFF)
    assert d == {"base": 0, "limit": 0xFFFFFFFF, "type": 0xA, "s": 1, "dpl": 0, "present": 1,
                 "avl": 0, "l": 0, "db": 1, "g": 1}
    d = decode_descriptor(0x12409A345678ABCD)   # byte-granular, scattered base bytes
    assert d["base"] == 0x12345678 and d["limit"] == 0xABCD and d["g"] == 0 and d["db"] == 1


def gdt_entry(memory, gdt: DescriptorTable, selector: int) -> int:
    index = selector >> 3
    assert 8 * index + 7 <= gdt.limit, f"selector {selector:#x} beyond the GDT limit"
    return memory.read_u64(gdt.base + 8 * index)


# --- the GDT -----------------------------------------------------------------------------


def test_write_gdt_location_and_limit(memory):
    gdt = boot_tables.write_gdt(memory)
    assert gdt.base == layout.BOOT_GDT
    assert gdt.limit == 8 * len(boot_tables.gdt_entries()) - 1
    assert memory.read_u64(layout.BOOT_GDT) == 0     # null descriptor


@pytest.mark.parametrize("make_state", [boot_tables.protected_mode_state, boot_tables.long_mode_state])
def test_gdt_descriptors_match_the_entry_segments(memory, make_state):
    """Reloading any selector from the GDT must give the segment the entry state loaded."""
    state = make_state(memory, ENTRY)
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        seg = state.segments[name]
        raw = gdt_entry(memory, state.gdt, seg.selector)
        assert decode_descriptor(raw) == segment_fields(seg), name


def test_gdt_tss_descriptor_survives_idt_setup(memory):
    """The TR selector's descriptor must be a present busy 32/64-bit TSS after write_gdt returns."""
    gdt = boot_tables.write_gdt(memory)
    raw = gdt_entry(memory, gdt, boot_tables.SELECTOR_TSS)
    d = decode_descriptor(raw)
    assert d["present"] == 1
    assert d["s"] == 0 and d["type"] == 0xB
    assert d["limit"] == 0x67


def test_gdt_and_idt_do_not_overlap(memory):
    gdt = boot_tables.write_gdt(memory)
    state = boot_tables.protected_mode_state(memory, ENTRY)
    gdt_range = range(gdt.base, gdt.base + gdt.limit + 1)
    idt_range = range(state.idt.base, state.idt.base + state.idt.limit + 1)
    assert not set(gdt_range) & set(idt_range)


def test_code_and_data_descriptor_kinds(memory):
    gdt = boot_tables.write_gdt(memory)
    code32 = decode_descriptor(gdt_entry(memory, gdt, boot_tables.SELECTOR_CODE32))
    code64 = decode_descriptor(gdt_entry(memory, gdt, boot_tables.SELECTOR_CODE64))
    data = decode_descriptor(gdt_entry(memory, gdt, boot_tables.SELECTOR_DATA))
    for d in (code32, code64, data):
        assert (d["base"], d["limit"], d["g"], d["s"], d["present"], d["dpl"]) == (0, 0xFFFFFFFF, 1, 1, 1, 0)
    assert code32["type"] & 0x8 and code64["type"] & 0x8            # executable
    assert not data["type"] & 0x8 and data["type"] & 0x2            # writable data
    assert (code32["l"], code32["db"]) == (0, 1)                    # 32-bit code
    assert (code64["l"], code64["db"]) == (1, 0)                    # 64-bit code (D must be 0 with L)
    assert data["db"] == 1


def test_segment_descriptor_encodes_base_and_byte_limit():
    seg = Segment(base=0x12345678, limit=0xABCDE, type=0x3, dpl=3, db=1)
    assert decode_descriptor(seg.descriptor()) == segment_fields(seg)


# --- identity page tables ----------------------------------------------------------------

P, RW, US, PS = 0x1, 0x2, 0x4, 0x80
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def walk(memory, cr3: int, va: int) -> int:
    """Translate `va` through 4-level paging with 2 MiB pages; assert P/RW/US at each level."""
    pml4e = memory.read_u64((cr3 & ADDR_MASK) + 8 * (va >> 39 & 0x1FF))
    assert pml4e & (P | RW | US) == P | RW | US, f"PML4E {pml4e:#x}"
    assert not pml4e & PS
    pdpte = memory.read_u64((pml4e & ADDR_MASK) + 8 * (va >> 30 & 0x1FF))
    assert pdpte & (P | RW | US) == P | RW | US, f"PDPTE {pdpte:#x}"
    assert not pdpte & PS, "expected a page directory, not a 1 GiB page"
    pde = memory.read_u64((pdpte & ADDR_MASK) + 8 * (va >> 21 & 0x1FF))
    assert pde & (P | RW | US | PS) == P | RW | US | PS, f"PDE {pde:#x}"
    return (pde & 0x000F_FFFF_FFE0_0000) | (va & 0x1FFFFF)


SAMPLE = [0, 0x1000, 2 * MiB - 1, 2 * MiB, 0x7FFF_FFFF, GiB - 1, GiB, 2 * GiB + 0x12345,
          3 * GiB, int(3.5 * GiB), layout.LAPIC_BASE, 4 * GiB - 2 * MiB, 4 * GiB - 1]


@pytest.mark.parametrize("va", SAMPLE, ids=hex)
def test_identity_mapping(memory, va):
    cr3 = boot_tables.write_identity_page_tables(memory)
    assert walk(memory, cr3, va) == va


def test_identity_mapping_every_2mib_page(memory):
    cr3 = boot_tables.write_identity_page_tables(memory)
    for va in range(0, 4 * GiB, 2 * MiB):
        assert walk(memory, cr3, va + 0x1ABCD) == va + 0x1ABCD


def test_nothing_mapped_above_4gib(memory):
    cr3 = boot_tables.write_identity_page_tables(memory)
    pml4 = cr3 & ADDR_MASK
    pml4e = memory.read_u64(pml4)
    pdpt = pml4e & ADDR_MASK
    assert memory.read_u64(pdpt + 8 * 4) & P == 0          # 4 GiB .. 5 GiB
    assert all(memory.read_u64(pml4 + 8 * i) & P == 0 for i in range(1, 512))


def test_page_tables_location(memory):
    cr3 = boot_tables.write_identity_page_tables(memory)
    assert cr3 == layout.PML4
    assert memory.read_u64(layout.PML4) & ADDR_MASK == layout.PDPT
    for d in range(4):
        assert memory.read_u64(layout.PDPT + 8 * d) & ADDR_MASK == layout.PAGE_DIRECTORIES + d * 0x1000


def test_page_tables_do_not_clobber_the_gdt(memory):
    boot_tables.write_gdt(memory)
    before = memory.read(layout.BOOT_GDT, 8 * len(boot_tables.gdt_entries()))
    boot_tables.write_identity_page_tables(memory)
    assert memory.read(layout.BOOT_GDT, len(before)) == before


# --- entry states ------------------------------------------------------------------------


def test_protected_mode_state(memory):
    s = boot_tables.protected_mode_state(memory, ENTRY)
    assert s.rip == ENTRY
    assert s.cr0 & CR0_PE and not s.cr0 & CR0_PG
    assert s.cr0 & CR0_ET
    assert not s.cr4 & CR4_PAE
    assert s.efer & (EFER_LME | EFER_LMA) == 0
    assert s.segments["cs"].selector == 0x08
    assert (s.segments["cs"].db, s.segments["cs"].l) == (1, 0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        assert s.segments[name].selector == 0x18, name
    assert s.segments["tr"].selector == 0x20
    assert s.gprs["rsp"] == layout.BOOT_STACK_TOP
    assert s.gdt.base == layout.BOOT_GDT
    assert s.idt.base == layout.BOOT_IDT


def test_long_mode_state(memory):
    s = boot_tables.long_mode_state(memory, ENTRY)
    assert s.rip == ENTRY
    assert s.cr0 & (CR0_PE | CR0_PG | CR0_NE | CR0_ET) == CR0_PE | CR0_PG | CR0_NE | CR0_ET
    assert s.cr4 & CR4_PAE
    assert s.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert s.cr3 == layout.PML4
    assert s.segments["cs"].selector == 0x10
    assert (s.segments["cs"].l, s.segments["cs"].db) == (1, 0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        assert s.segments[name].selector == 0x18, name
    # the CR3 it hands over really identity-maps the entry point and the stack
    assert walk(memory, s.cr3, ENTRY) == ENTRY
    assert walk(memory, s.cr3, s.gprs["rsp"]) == s.gprs["rsp"]


def test_protected_mode_state_leaves_page_tables_alone(memory):
    boot_tables.protected_mode_state(memory, ENTRY)
    assert memory.read_u64(layout.PML4) == 0
    assert memory.read_u64(layout.PDPT) == 0


# --- CpuState serialisation --------------------------------------------------------------


def test_to_dict_from_dict_round_trip(memory):
    s = boot_tables.long_mode_state(memory, 0x123456)
    s.gprs["rbx"] = 0x9500
    s.msrs = {0xC0000080: 0x500, 0x174: 0x10}
    s.apic_base = 0xFEE00900
    again = CpuState.from_dict(s.to_dict())
    assert again == s
    assert again.segments["cs"] == s.segments["cs"]
    assert isinstance(again.gdt, DescriptorTable)


def test_to_dict_is_json_serialisable_and_survives_json(memory):
    s = boot_tables.protected_mode_state(memory, ENTRY)
    s.msrs = {0x10: 12345, 0xC0000100: 0xFFFF800000000000}
    text = json.dumps(s.to_dict())
    again = CpuState.from_dict(json.loads(text))
    assert again == s
    assert again.msrs == {0x10: 12345, 0xC0000100: 0xFFFF800000000000}
    assert all(isinstance(k, int) for k in again.msrs)
    assert set(again.gprs) == set(GPR_NAMES)


def test_to_dict_does_not_alias_the_state(memory):
    s = boot_tables.protected_mode_state(memory, ENTRY)
    d = s.to_dict()
    d["segments"]["cs"]["selector"] = 0x99
    d["gdt"]["base"] = 0x1234
    d["gprs"]["rax"] = 7
    assert s.segments["cs"].selector == 0x08
    assert s.gdt.base == layout.BOOT_GDT
    assert s.gprs["rax"] == 0


def test_default_state_round_trip():
    s = CpuState()
    assert CpuState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert CpuState.from_dict(s.to_dict()).apic_base is None
