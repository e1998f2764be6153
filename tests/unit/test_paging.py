"""The guest page walker (arch/x86_64/paging.py) against hand-built page tables."""

from __future__ import annotations

import pytest

from pyvmm.arch.x86_64 import layout
from pyvmm.arch.x86_64.paging import (
    PF_FETCH, PF_PRESENT, PF_USER, PF_WRITE, PTE_ACCESSED, PTE_DIRTY, PageFault, PagingMode,
    read_linear, translate, write_linear,
)
from pyvmm.memory import GuestMemory

P, RW, US, PS, NX = 1, 2, 4, 0x80, 1 << 63
CR0_PE_PG, CR0_WP, CR4_PAE, EFER_LMA_NXE = 0x80000001, 1 << 16, 0x20, (1 << 10) | (1 << 11)
PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000


@pytest.fixture
def memory():
    with GuestMemory.from_specs(layout.ram_regions(8 << 20)) as mem:
        mem.write_u64(PML4, PDPT | P | RW | US)
        mem.write_u64(PDPT, PD | P | RW | US)
        mem.write_u64(PD + 0 * 8, PT | P | RW | US)                  # 0-2 MiB through a page table
        mem.write_u64(PD + 1 * 8, 0x200000 | P | RW | PS)           # 2-4 MiB: one supervisor 2 MiB page
        mem.write_u64(PT + 0x100 * 8, 0x300000 | P | US)            # 0x100000 -> 0x300000, read-only user
        mem.write_u64(PT + 0x101 * 8, 0x301000 | P | RW | US | NX)  # 0x101000 -> 0x301000, no-execute
        yield mem


def long_mode(cr0=CR0_PE_PG | CR0_WP) -> PagingMode:
    return PagingMode(cr0=cr0, cr3=PML4, cr4=CR4_PAE, efer=EFER_LMA_NXE)


def test_paging_off_is_identity(memory):
    assert translate(memory, PagingMode(0x11, 0, 0, 0), 0x123456).physical == 0x123456


def test_4k_page_translation_and_steps(memory):
    t = translate(memory, long_mode(), 0x100abc)
    assert t.physical == 0x300abc and t.page_size == 4096 and t.user and not t.writable
    assert [name for name, _, _ in t.steps] == ["PML4", "PDPT", "PD", "PT"]


def test_2m_page(memory):
    t = translate(memory, long_mode(), 0x345678)  # in the 2-4 MiB page (PD slot 1)
    assert (t.physical, t.page_size, t.user) == (0x345678, 2 << 20, False)
    assert [name for name, _, _ in t.steps] == ["PML4", "PDPT", "PD"]


def test_accessed_and_dirty_bits_are_set_like_the_cpu(memory):
    translate(memory, long_mode(), 0x101000, write=True)
    pte = memory.read_u64(PT + 0x101 * 8)
    assert pte & PTE_ACCESSED and pte & PTE_DIRTY


@pytest.mark.parametrize("linear,kwargs,error", [
    (0x5000000, {}, 0),                                    # PDE not present
    (0x8000000000, {"write": True}, PF_WRITE),              # PML4E not present, write
    (0x200000, {"user": True}, PF_PRESENT | PF_USER),      # supervisor page from user mode
    (0x100000, {"write": True}, PF_PRESENT | PF_WRITE),    # read-only page, CR0.WP set
    (0x101000, {"fetch": True}, PF_PRESENT | PF_FETCH),    # NX page
])
def test_faults_carry_the_architectural_error_code(memory, linear, kwargs, error):
    with pytest.raises(PageFault) as info:
        translate(memory, long_mode(), linear, **kwargs)
    assert info.value.error_code == error and info.value.linear == linear


def test_supervisor_writes_ignore_read_only_without_cr0_wp(memory):
    assert translate(memory, long_mode(cr0=CR0_PE_PG), 0x100000, write=True).physical == 0x300000


def test_linear_reads_and_writes_cross_pages(memory):
    write_linear(memory, PagingMode(0x11, 0, 0, 0), 0x4FFE, b"abcd")
    assert read_linear(memory, PagingMode(0x11, 0, 0, 0), 0x4FFE, 4) == b"abcd"
    memory.write(0x300FFE, b"xy")
    memory.write(0x301000, b"zw")
    assert read_linear(memory, long_mode(), 0x100FFE, 4) == b"xyzw"  # two different frames
