"""The guest's page walk, level by level, for people: `pyvmm mem translate` and `mem read`.

paging.translate() is the walk the software CPU needs (fast, sets accessed/dirty bits, raises
the architectural #PF). This one never writes guest memory and records every level it read:
the table's guest-physical address, the index, the entry and its decoded flags, and, when the
walk cannot finish, where it stopped and why (an entry not present, a reserved bit set, a
table outside RAM, a non-canonical address). Every x86 paging mode: off, 32-bit (with 4 MiB
pages and PSE-36), PAE (the four PDPTEs CR3 points to), 4-level and 5-level (CR4.LA57).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .paging import ADDRESS_MASK, EFER_NXE, PTE_HUGE, PTE_NX, PTE_PRESENT, PTE_USER, PTE_WRITE, PagingMode
from .cpu_state import CR4_PAE, EFER_LMA

CR4_PSE = 1 << 4
CR4_LA57 = 1 << 12

_FLAG_BITS = ((0, "P"), (1, "RW"), (2, "US"), (3, "PWT"), (4, "PCD"), (5, "A"), (6, "D"), (7, "PS"),
              (8, "G"), (63, "NX"))


def decode_flags(entry: int, level: str) -> list[str]:
    """The names of the set flag bits of a paging entry (bit 7 is PAT in a page-table entry)."""
    names = []
    for bit, name in _FLAG_BITS:
        if entry >> bit & 1:
            names.append("PAT" if bit == 7 and level == "PT" else name)
    return names


@dataclass(frozen=True)
class WalkStep:
    level: str           # PML5, PML4, PDPT, PD, PT (PDPT also for PAE's four pointers)
    table: int           # guest-physical address of the table
    index: int           # which entry of it the address selects
    entry_address: int
    entry: int | None    # None: the table is not in guest RAM
    flags: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"level": self.level, "table": self.table, "index": self.index, "entry_address": self.entry_address,
                "entry": self.entry, "flags": list(self.flags)}


@dataclass
class Walk:
    linear: int
    mode: str                              # off | 32-bit | PAE | 4-level | 5-level
    steps: list[WalkStep] = field(default_factory=list)
    physical: int | None = None            # None: the walk stopped (see fault)
    page_size: int | None = None
    writable: bool = True                  # what the whole walk allows (AND over the levels)
    user: bool = True
    executable: bool = True
    fault: str | None = None               # why the walk stopped, one line

    @property
    def mapped(self) -> bool:
        return self.physical is not None

    def to_dict(self) -> dict:
        return {"gva": self.linear, "mode": self.mode, "levels": [step.to_dict() for step in self.steps],
                "mapped": self.mapped, "fault": self.fault, "gpa": self.physical, "page_size": self.page_size,
                "access": None if not self.mapped else
                {"writable": self.writable, "user": self.user, "executable": self.executable}}


def paging_mode_name(mode: PagingMode) -> str:
    if not mode.enabled:
        return "off"
    if mode.efer & EFER_LMA:
        return "5-level" if mode.cr4 & CR4_LA57 else "4-level"
    return "PAE" if mode.cr4 & CR4_PAE else "32-bit"


def walk(memory, mode: PagingMode, linear: int) -> Walk:
    """Walk the guest's page tables for `linear` without changing them (no accessed bits)."""
    name = paging_mode_name(mode)
    result = Walk(linear, name)
    if linear < 0 or linear >> 64:
        result.fault = f"{linear:#x} is not a 64-bit address"
        return result
    if name == "off":
        if linear >> 32:
            result.fault = f"paging is off: linear addresses are 32-bit ({linear:#x} is above 4 GiB)"
        else:
            result.physical, result.page_size = linear, None
        return result
    if name in ("4-level", "5-level"):
        width = 57 if name == "5-level" else 48
        top = linear >> (width - 1)
        if top not in (0, (1 << (65 - width)) - 1):
            result.fault = f"{linear:#x} is not canonical for {name} paging (bits 63:{width - 1} must all equal " \
                           f"bit {width - 1})"
            return result
        levels: tuple[tuple[str, int], ...] = (("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12))
        if name == "5-level":
            levels = (("PML5", 48), *levels)
        _walk_tables(memory, mode, result, levels, mode.cr3 & ADDRESS_MASK, 8, 9)
    elif name == "PAE":
        if linear >> 32:
            result.fault = f"PAE paging: linear addresses are 32-bit ({linear:#x} is above 4 GiB)"
            return result
        pointers = mode.cr3 & 0xFFFF_FFE0
        index = linear >> 30 & 3
        entry = _read(memory, pointers + index * 8, 8)
        result.steps.append(WalkStep("PDPT", pointers, index, pointers + index * 8, entry,
                                     tuple(decode_flags(entry or 0, "PDPT"))))
        if entry is None:
            result.fault = f"PDPT (PAE's four pointers) at {pointers:#x} is outside guest RAM"
        elif not entry & PTE_PRESENT:
            result.fault = f"PDPT entry {index} at {pointers + index * 8:#x} is not present ({entry:#x})"
        elif entry & 0x1E6:  # bits 1, 2, 5-8 of a PAE PDPTE are reserved
            result.fault = f"PDPT entry {index} at {pointers + index * 8:#x} has reserved bits set ({entry:#x})"
        else:
            _walk_tables(memory, mode, result, (("PD", 21), ("PT", 12)), entry & ADDRESS_MASK, 8, 9)
    else:
        if linear >> 32:
            result.fault = f"32-bit paging: linear addresses are 32-bit ({linear:#x} is above 4 GiB)"
            return result
        _walk_tables(memory, mode, result, (("PD", 22), ("PT", 12)), mode.cr3 & 0xFFFF_F000, 4, 10)
    return result


def _read(memory, address: int, size: int) -> int | None:
    try:
        return memory.read_u64(address) if size == 8 else memory.read_u32(address)
    except Exception:  # noqa: BLE001 - any access outside RAM: the walk says so
        return None


def _walk_tables(memory, mode: PagingMode, result: Walk, levels, table: int, entry_size: int,
                 index_bits: int) -> None:
    nx_enabled = entry_size == 8 and bool(mode.efer & EFER_NXE)
    for depth, (level, shift) in enumerate(levels):
        index = result.linear >> shift & ((1 << index_bits) - 1)
        entry_address = table + index * entry_size
        entry = _read(memory, entry_address, entry_size)
        result.steps.append(WalkStep(level, table, index, entry_address, entry,
                                     tuple(decode_flags(entry or 0, level))))
        where = f"{level} entry {index} at {entry_address:#x}"
        if entry is None:
            result.fault = f"the {level} table at {table:#x} is outside guest RAM"
            return
        if not entry & PTE_PRESENT:
            result.fault = f"{where} is not present ({entry:#x})"
            return
        if entry & PTE_NX and entry_size == 8 and not nx_enabled:
            result.fault = f"{where} sets NX (bit 63) while EFER.NXE is off: a reserved bit"
            return
        if entry & PTE_HUGE and level in ("PML5", "PML4"):
            result.fault = f"{where} sets PS (bit 7), reserved at this level"
            return
        result.writable &= bool(entry & PTE_WRITE)
        result.user &= bool(entry & PTE_USER)
        if nx_enabled and entry & PTE_NX:
            result.executable = False
        last = depth == len(levels) - 1
        huge = not last and bool(entry & PTE_HUGE) and (entry_size == 8 or bool(mode.cr4 & CR4_PSE))
        if last or huge:
            page_size = 1 << shift
            if entry_size == 4 and huge:  # a 4 MiB page; PSE-36 puts address bits 39:32 in 20:13
                frame = entry & 0xFFC0_0000 | (entry >> 13 & 0xFF) << 32
            elif huge:  # bit 12 is PAT in a large page's entry, not an address bit
                frame = entry & ADDRESS_MASK & ~(page_size - 1)
            else:
                frame = entry & (ADDRESS_MASK if entry_size == 8 else 0xFFFF_F000)
            result.physical, result.page_size = frame | result.linear & (page_size - 1), page_size
            return
        table = entry & (ADDRESS_MASK if entry_size == 8 else 0xFFFF_F000)
