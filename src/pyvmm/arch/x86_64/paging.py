"""Walk the guest's page tables: guest-virtual (linear) -> guest-physical.

Used by the software CPU to read the IDT, TSS and stacks during exception
delivery, and by tools that show how a guest virtual address is translated.
Supports paging off, 32-bit 2-level paging (with 4 MiB pages) and 4-level
IA-32e paging (4 KiB, 2 MiB and 1 GiB pages). A failed walk raises PageFault
with the architectural error code, so delivery can turn it into a #PF.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import PyvmmError
from .cpu_state import CR0_PG, CR4_PAE, EFER_LMA

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_HUGE = 1 << 7
PTE_NX = 1 << 63
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
CR0_WP = 1 << 16
CR4_PSE = 1 << 4
EFER_NXE = 1 << 11

# #PF error-code bits
PF_PRESENT, PF_WRITE, PF_USER, PF_RESERVED, PF_FETCH = 1, 2, 4, 8, 16


class PageFault(PyvmmError):
    def __init__(self, linear: int, error_code: int) -> None:
        super().__init__(f"page fault at {linear:#x} (error code {error_code:#x})")
        self.linear, self.error_code = linear, error_code


@dataclass
class Translation:
    linear: int
    physical: int
    writable: bool
    user: bool
    executable: bool
    page_size: int
    steps: list[tuple[str, int, int]] = field(default_factory=list)  # (level, entry address, entry value)


@dataclass(frozen=True)
class PagingMode:
    cr0: int
    cr3: int
    cr4: int
    efer: int

    @property
    def enabled(self) -> bool:
        return bool(self.cr0 & CR0_PG)


def translate(memory, mode: PagingMode, linear: int, *, write: bool = False, user: bool = False,
              fetch: bool = False, set_accessed: bool = True) -> Translation:
    """Translate `linear` as the CPU would for this access, or raise PageFault."""
    if not mode.enabled:
        return Translation(linear, linear & 0xFFFF_FFFF, True, True, True, 1 << 32)
    access = (PF_WRITE if write else 0) | (PF_USER if user else 0) | (PF_FETCH if fetch else 0)
    levels: tuple[tuple[str, int], ...]  # (name, the shift of its index bits), root first
    if mode.efer & EFER_LMA:
        levels = (("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12))
        entry_size, index_bits = 8, 9
        table = mode.cr3 & ADDRESS_MASK
    elif mode.cr4 & CR4_PAE:
        raise NotImplementedError("32-bit PAE paging is not supported by pyvmm's page walker")
    else:
        levels = (("PD", 22), ("PT", 12))
        entry_size, index_bits = 4, 10
        table = mode.cr3 & 0xFFFF_F000
        linear &= 0xFFFF_FFFF
    writable = user_ok = executable = True
    steps = []
    for depth, (name, shift) in enumerate(levels):
        entry_address = table + ((linear >> shift) & ((1 << index_bits) - 1)) * entry_size
        try:
            entry = memory.read_u64(entry_address) if entry_size == 8 else memory.read_u32(entry_address)
        except Exception:  # a table outside RAM: the walk fails like a not-present entry
            raise PageFault(linear, access) from None
        steps.append((name, entry_address, entry))
        if not entry & PTE_PRESENT:
            raise PageFault(linear, access)
        writable &= bool(entry & PTE_WRITE)
        user_ok &= bool(entry & PTE_USER)
        if entry_size == 8 and mode.efer & EFER_NXE and entry & PTE_NX:
            executable = False
        last = depth == len(levels) - 1
        huge = not last and entry & PTE_HUGE and (entry_size == 8 and name in ("PDPT", "PD") or
                                                   entry_size == 4 and mode.cr4 & CR4_PSE)
        if set_accessed and not entry & PTE_ACCESSED:
            _set_bits(memory, entry_address, entry_size, PTE_ACCESSED)
        if last or huge:
            page_size = 1 << shift
            frame = entry & ADDRESS_MASK & ~(page_size - 1)
            if entry_size == 4 and huge:
                frame = entry & 0xFFC0_0000
            _check(linear, access | PF_PRESENT, write, user, fetch, writable, user_ok, executable, mode)
            if write and set_accessed and not entry & PTE_DIRTY:
                _set_bits(memory, entry_address, entry_size, PTE_DIRTY)
            return Translation(linear, frame | (linear & (page_size - 1)), writable, user_ok, executable, page_size, steps)
        table = entry & ADDRESS_MASK if entry_size == 8 else entry & 0xFFFF_F000
    raise AssertionError("unreachable")


def _check(linear, error, write, user, fetch, writable, user_ok, executable, mode) -> None:
    if user and not user_ok:
        raise PageFault(linear, error)
    if write and not writable and (user or mode.cr0 & CR0_WP):
        raise PageFault(linear, error)
    if fetch and not executable:
        raise PageFault(linear, error)


def _set_bits(memory, address: int, size: int, bits: int) -> None:
    if size == 8:
        memory.write_u64(address, memory.read_u64(address) | bits)
    else:
        memory.write_u32(address, memory.read_u32(address) | bits)


def read_linear(memory, mode: PagingMode, linear: int, size: int, *, user: bool = False) -> bytes:
    """Read `size` bytes at a linear address, page by page."""
    out = bytearray()
    while size:
        t = translate(memory, mode, linear, user=user)
        chunk = min(size, t.page_size - (linear & (t.page_size - 1)))
        out += memory.read(t.physical, chunk)
        linear, size = linear + chunk, size - chunk
    return bytes(out)


def write_linear(memory, mode: PagingMode, linear: int, data: bytes, *, user: bool = False) -> None:
    """Write bytes at a linear address, page by page (checks write permission first for all pages)."""
    pieces = []
    offset = 0
    while offset < len(data):
        t = translate(memory, mode, linear + offset, write=True, user=user)
        chunk = min(len(data) - offset, t.page_size - ((linear + offset) & (t.page_size - 1)))
        pieces.append((t.physical, data[offset:offset + chunk]))
        offset += chunk
    for physical, piece in pieces:
        memory.write(physical, piece)
