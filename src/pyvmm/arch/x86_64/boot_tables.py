"""The GDT, identity page tables and initial CPU state pyvmm gives a kernel at entry.

The selectors follow the Linux boot protocol's choice (__BOOT_CS = 0x10,
__BOOT_DS = 0x18) so the same GDT serves Linux, ELF and Multiboot kernels.
"""

from __future__ import annotations

from . import layout
from .cpu_state import (
    CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE,
    EFER_LMA, EFER_LME, CpuState, DescriptorTable, Segment,
)

SELECTOR_CODE32 = 0x08
SELECTOR_CODE64 = 0x10
SELECTOR_DATA = 0x18
SELECTOR_TSS = 0x20

PAGE_PRESENT, PAGE_RW, PAGE_USER, PAGE_HUGE = 0x1, 0x2, 0x4, 0x80
IDENTITY_MAPPED_BYTES = 4 << 30


def _code32() -> Segment:
    return Segment(selector=SELECTOR_CODE32, limit=0xFFFFFFFF, type=0xB, db=1, g=1)


def _code64() -> Segment:
    return Segment(selector=SELECTOR_CODE64, limit=0xFFFFFFFF, type=0xB, l=1, g=1)


def _data() -> Segment:
    return Segment(selector=SELECTOR_DATA, limit=0xFFFFFFFF, type=0x3, db=1, g=1)


def _tss() -> Segment:
    # KVM (VMX) insists on a present, busy TSS in TR; the guest never switches through it.
    return Segment(selector=SELECTOR_TSS, limit=0x67, type=0xB, s=0)


def gdt_entries() -> list[int]:
    return [0, _code32().descriptor(), _code64().descriptor(), _data().descriptor(), _tss().descriptor(), 0]


def write_gdt(memory) -> DescriptorTable:
    entries = gdt_entries()
    assert layout.BOOT_GDT + 8 * len(entries) <= layout.BOOT_IDT, "boot GDT would run into the boot IDT"
    for i, descriptor in enumerate(entries):
        memory.write_u64(layout.BOOT_GDT + 8 * i, descriptor)
    memory.write_u64(layout.BOOT_IDT, 0)  # an empty IDT until the kernel installs its own
    return DescriptorTable(layout.BOOT_GDT, 8 * len(entries) - 1)


def write_identity_page_tables(memory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; returns CR3.

    U/S is set at every level so that tiny test guests can drop to CPL3 in place
    (the calibration guest does); a real kernel replaces these tables at once.
    """
    flags = PAGE_PRESENT | PAGE_RW | PAGE_USER
    memory.write_u64(layout.PML4, layout.PDPT | flags)
    directories = IDENTITY_MAPPED_BYTES >> 30
    for d in range(directories):
        directory = layout.PAGE_DIRECTORIES + d * 0x1000
        memory.write_u64(layout.PDPT + 8 * d, directory | flags)
        entries = b"".join(
            ((((d << 30) | (i << 21)) | flags | PAGE_HUGE)).to_bytes(8, "little") for i in range(512)
        )
        memory.write(directory, entries)
    return layout.PML4


def protected_mode_state(memory, entry: int) -> CpuState:
    """Flat 32-bit protected mode, paging off: the Multiboot machine state."""
    gdt = write_gdt(memory)
    data = _data()
    state = CpuState(rip=entry, gdt=gdt, idt=DescriptorTable(layout.BOOT_IDT, 0))
    state.segments = {"cs": _code32(), "ds": data, "es": data, "fs": data, "gs": data, "ss": data,
                      "tr": _tss(), "ldt": Segment(type=0x2, s=0, present=1, limit=0xFFFF)}
    state.cr0 = CR0_PE | CR0_ET
    state.gprs["rsp"] = layout.BOOT_STACK_TOP
    return state


def long_mode_state(memory, entry: int) -> CpuState:
    """64-bit long mode with the first 4 GiB identity-mapped: the 64-bit boot protocol state."""
    state = protected_mode_state(memory, entry)
    state.segments["cs"] = _code64()
    state.cr3 = write_identity_page_tables(memory)
    state.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    state.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    state.efer = EFER_LME | EFER_LMA
    return state
