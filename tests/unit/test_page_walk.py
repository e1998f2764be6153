"""The inspector's page walk (arch/x86_64/page_walk.py) in every paging mode, against hand-built
tables, and against the software CPU's walker (paging.translate) on random 4-level tables;
/proc/self/pagemap's reading (memory/pagemap.py)."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm.arch.x86_64 import layout
from pyvmm.arch.x86_64.page_walk import decode_flags, walk
from pyvmm.arch.x86_64.paging import PageFault, PagingMode, translate
from pyvmm.memory import GuestMemory
from pyvmm.memory.pagemap import host_page

P, RW, US, A, D, PS, G, NX = 1, 2, 4, 0x20, 0x40, 0x80, 0x100, 1 << 63
CR0_PG = 0x80000001
CR4_PSE, CR4_PAE, CR4_LA57 = 0x10, 0x20, 1 << 12
EFER_LMA_NXE = (1 << 10) | (1 << 8) | (1 << 11)
T1, T2, T3, T4, T5 = 0x10000, 0x11000, 0x12000, 0x13000, 0x14000


@pytest.fixture
def memory():
    with GuestMemory.from_specs(layout.ram_regions(8 << 20)) as mem:
        yield mem


def long_mode(cr3=T1, la57=False, nxe=True) -> PagingMode:
    efer = EFER_LMA_NXE if nxe else (1 << 10) | (1 << 8)
    return PagingMode(CR0_PG, cr3, CR4_PAE | (CR4_LA57 if la57 else 0), efer)


def test_4_level_4k_page_every_level_with_its_flags(memory):
    memory.write_u64(T1 + 511 * 8, T2 | P | RW | US | A)
    memory.write_u64(T2 + 510 * 8, T3 | P | RW | US)
    memory.write_u64(T3 + 3 * 8, T4 | P | RW)
    memory.write_u64(T4 + 7 * 8, 0x345000 | P | A | D | G | NX | PS)   # bit 7 of a PTE is PAT
    gva = 0xFFFF_FFFF_8060_7ABC  # PML4 511, PDPT 510, PD 3, PT 7
    result = walk(memory, long_mode(), gva)
    assert result.mode == "4-level" and result.mapped and result.fault is None
    assert [(s.level, s.table, s.index, s.entry_address) for s in result.steps] == [
        ("PML4", T1, 511, T1 + 511 * 8), ("PDPT", T2, 510, T2 + 510 * 8), ("PD", T3, 3, T3 + 3 * 8),
        ("PT", T4, 7, T4 + 7 * 8)]
    assert result.steps[0].flags == ("P", "RW", "US", "A")
    assert result.steps[3].flags == ("P", "A", "D", "PAT", "G", "NX")
    assert (result.physical, result.page_size) == (0x345ABC, 4096)
    assert (result.writable, result.user, result.executable) == (False, False, False)
    assert memory.read_u64(T2 + 510 * 8) & A == 0  # read only: no accessed bit set


def test_2m_and_1g_pages_stop_at_their_level(memory):
    memory.write_u64(T1, T2 | P | RW | US)
    memory.write_u64(T2 + 1 * 8, 0x4000_0000 * 5 | P | RW | US | PS)   # GVA 1-2 GiB -> 5 GiB, 1 GiB page
    memory.write_u64(T2, T3 | P | RW | US)
    memory.write_u64(T3 + 2 * 8, 0x600000 | P | PS | (1 << 12))        # bit 12: PAT of a large page
    big = walk(memory, long_mode(), 0x4123_4567)
    assert [s.level for s in big.steps] == ["PML4", "PDPT"]
    assert (big.physical, big.page_size) == (5 * 0x4000_0000 + 0x0123_4567, 1 << 30)
    middle = walk(memory, long_mode(), 0x45_6789)
    assert [s.level for s in middle.steps] == ["PML4", "PDPT", "PD"] and "PS" in middle.steps[2].flags
    assert (middle.physical, middle.page_size, middle.writable) == (0x656789, 2 << 20, False)


def test_5_level_paging_adds_pml5(memory):
    memory.write_u64(T1 + 1 * 8, T2 | P | RW)           # PML5 index 1: bits 56:48 of the GVA
    memory.write_u64(T2, T3 | P | RW)
    memory.write_u64(T3, T4 | P | RW)
    memory.write_u64(T4, 0x200000 | P | RW | PS)
    result = walk(memory, long_mode(la57=True), (1 << 48) | 0x1234)
    assert result.mode == "5-level" and [s.level for s in result.steps] == ["PML5", "PML4", "PDPT", "PD"]
    assert result.physical == 0x201234
    # canonical in 5-level (bit 56 extends), not in 4-level
    assert walk(memory, long_mode(), 1 << 48).fault.endswith("(bits 63:47 must all equal bit 47)")


def test_pae_paging_four_pointers_then_pd_and_pt(memory):
    cr3 = T1 + 0x20  # 32-byte aligned
    memory.write_u64(cr3 + 2 * 8, T2 | P)                 # GVA 2-3 GiB
    memory.write_u64(T2 + 1 * 8, T3 | P | RW | US)
    memory.write_u64(T3 + 4 * 8, 0x7000 | P | RW | US)
    memory.write_u64(T2 + 2 * 8, 0x400000 | P | PS)       # a 2 MiB page
    mode = PagingMode(CR0_PG, cr3, CR4_PAE, 0)
    small = walk(memory, mode, 0x8020_4321)
    assert small.mode == "PAE" and [(s.level, s.index) for s in small.steps] == [("PDPT", 2), ("PD", 1), ("PT", 4)]
    assert (small.physical, small.page_size, small.writable, small.user) == (0x7321, 4096, True, True)
    assert walk(memory, mode, 0x8045_6789).physical == 0x456789
    missing = walk(memory, mode, 0x4000_0000)
    assert missing.fault == f"PDPT entry 1 at {cr3 + 8:#x} is not present (0x0)"
    memory.write_u64(cr3, T2 | P | RW)                     # RW is reserved in a PAE PDPTE
    assert "reserved bits" in walk(memory, mode, 0x1000).fault


def test_32_bit_paging_4k_4m_and_pse36(memory):
    memory.write_u32(T1 + 1 * 4, T2 | P | RW | US)
    memory.write_u32(T2 + 2 * 4, 0x5000 | P | US)
    memory.write_u32(T1 + 3 * 4, 0x0080_0000 | (0x3 << 13) | P | RW | PS)   # 4 MiB page at 0x3_0080_0000
    mode = PagingMode(CR0_PG, T1, CR4_PSE, 0)
    small = walk(memory, mode, 0x0040_2ABC)
    assert small.mode == "32-bit" and [s.level for s in small.steps] == ["PD", "PT"]
    assert (small.physical, small.page_size, small.writable) == (0x5ABC, 4096, False)
    big = walk(memory, mode, 0x00C1_2345)
    assert (big.physical, big.page_size) == (0x3_0080_0000 | 0x1_2345, 4 << 20)
    without_pse = walk(memory, PagingMode(CR0_PG, T1, 0, 0), 0x00C1_2345)  # PS ignored: 0x800000 is a table
    assert [s.level for s in without_pse.steps] == ["PD", "PT"]


@pytest.mark.parametrize("setup,gva,mode,fault", [
    (lambda m: None, 0x1000, long_mode(), f"PML4 entry 0 at {T1:#x} is not present (0x0)"),
    (lambda m: m.write_u64(T1, T2 | P | PS), 0x1000, long_mode(), f"PML4 entry 0 at {T1:#x} sets PS (bit 7), "
     "reserved at this level"),
    (lambda m: m.write_u64(T1, T2 | P | NX), 0x1000, long_mode(nxe=False),
     f"PML4 entry 0 at {T1:#x} sets NX (bit 63) while EFER.NXE is off: a reserved bit"),
    (lambda m: m.write_u64(T1, (1 << 40) | P), 0x1000, long_mode(), f"the PDPT table at {1 << 40:#x} is outside "
     "guest RAM"),
    (lambda m: None, 0x0000_8000_0000_0000, long_mode(), "0x800000000000 is not canonical for 4-level paging "
     "(bits 63:47 must all equal bit 47)"),
    (lambda m: None, 1 << 32, PagingMode(0x11, 0, 0, 0), "paging is off: linear addresses are 32-bit "
     "(0x100000000 is above 4 GiB)"),
])
def test_where_and_why_a_walk_stops(memory, setup, gva, mode, fault):
    setup(memory)
    result = walk(memory, mode, gva)
    assert not result.mapped and result.physical is None and result.fault == fault


def test_a_table_outside_ram_is_recorded_with_no_entry(memory):
    result = walk(memory, long_mode(cr3=1 << 40), 0x1000)
    assert result.steps[0].entry is None and result.fault == f"the PML4 table at {1 << 40:#x} is outside guest RAM"


def test_paging_off_is_identity(memory):
    result = walk(memory, PagingMode(0x11, 0, 0, 0), 0x12345)
    assert (result.mode, result.physical, result.steps) == ("off", 0x12345, [])


def test_decode_flags_names_bit_7_by_level():
    assert decode_flags(P | RW | PS, "PD") == ["P", "RW", "PS"]
    assert decode_flags(P | PS, "PT") == ["P", "PAT"]


_entry_bits = st.sets(st.sampled_from([RW, US, PS, NX]))


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.booleans(), _entry_bits, st.integers(0, 7)), min_size=4, max_size=4),
       gva=st.integers(0, (1 << 47) - 1))
def test_agrees_with_the_software_cpus_walker(entries, gva):
    """Random 4-level tables (entries present or not, RW/US/PS/NX, pointing at one of 8 frames):
    the inspector maps a GVA exactly when paging.translate does, to the same place and rights."""
    with GuestMemory.from_specs(layout.ram_regions(8 << 20)) as memory:
        tables = [T1, T2, T3, T4]
        shifts = (39, 30, 21, 12)
        for depth, (present, bits, frame) in enumerate(entries):
            if depth == 0:
                bits = bits - {PS}  # reserved in a PML4E: paging.translate does not check it
            target = tables[depth + 1] if depth < 3 else 0x100000
            if PS in bits and depth in (1, 2):
                target = 0  # a large page frame: aligned, in RAM for 2 MiB
            address = target + (frame << 12 if depth == 3 else 0)
            value = address | (P if present else 0)
            for bit in bits:
                value |= bit
            memory.write_u64(tables[depth] + (gva >> shifts[depth] & 511) * 8, value)
        mode = long_mode()
        result = walk(memory, mode, gva)
        try:
            expected = translate(memory, mode, gva, set_accessed=False)
        except PageFault:
            assert not result.mapped
        else:
            assert result.mapped
            assert (result.physical, result.page_size) == (expected.physical, expected.page_size)
            assert (result.writable, result.user, result.executable) == \
                (expected.writable, expected.user, expected.executable)


def test_pagemap_knows_a_touched_page_from_an_untouched_one():
    area = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    anchor = ctypes.c_char.from_buffer(area)
    try:
        base = ctypes.addressof(anchor)
        untouched = host_page(base + mmap.PAGESIZE + 5)
        assert not untouched.present and untouched.physical is None and "not resident" in untouched.note
        area[0] = 1
        touched = host_page(base + 5)
        assert touched.present and touched.virtual == base + 5
        if os.geteuid() == 0:  # only root sees frame numbers
            assert touched.physical is not None and touched.physical % mmap.PAGESIZE == 5
        else:
            assert touched.physical is None and "CAP_SYS_ADMIN" in touched.note
    finally:
        del anchor
        area.close()
