"""What every kernel loader hands back, its error type, and the shared placement rules.

Loaders work in two steps: they first build a list of `Placement`s (checked
against guest RAM and pyvmm's own boot area), then write them all.  A bad image
therefore fails before a single guest byte has changed.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from ..errors import UserError
from ..arch.x86_64 import boot_tables, layout
from ..arch.x86_64.cpu_state import CpuState
from ..memory.guest_memory import GuestMemory, GuestMemoryError

logger = logging.getLogger(__name__)

# Below 1 MiB, 0x0 .. LOW_LOAD_START-1 holds pyvmm's GDT, page tables, zero page,
# multiboot info and command line; from EBDA_START up to 1 MiB is reported reserved.
# In between, kernels may place things such as AP start-up trampolines.
LOW_LOAD_START = layout.CMDLINE + layout.CMDLINE_MAX  # 0x30000
LOW_LOAD_END = layout.EBDA_START                      # 0x9fc00
# A Multiboot kernel starts in protected mode without paging: of those structures only the boot
# GDT (page 0, with the real-mode IVT and BDA) stays where it is; the information structure and
# command line move out of its way (multiboot.place_info).
MULTIBOOT_LOW_LOAD_START = 0x1000
FOUR_GIB = 1 << 32


class CpuMode(enum.Enum):
    """The CPU state the kernel expects at its entry point."""

    PROTECTED_32 = "protected-32"  # flat 32-bit protected mode, paging off
    LONG_64 = "long-64"            # 64-bit mode on pyvmm's identity map of the first 4 GiB


@dataclass
class BootEntry:
    """How to start a loaded kernel."""

    mode: CpuMode
    entry: int
    registers: dict[str, int] = field(default_factory=dict)  # extra initial GPRs, lowercase names
    kind: str = ""                                           # e.g. "Multiboot ELF32 kernel"
    loaded: list[tuple[int, int]] = field(default_factory=list)  # guest (address, size) written
    cmdline: str = ""


class LoaderError(UserError):
    """A kernel or module that cannot be loaded; str() is one line fit for the user."""

    def __init__(self, message: object) -> None:
        text = str(message).replace("\r", " ").replace("\n", " ")
        super().__init__(text)


@dataclass(frozen=True)
class Placement:
    """`data` goes at `address`, followed by zeros up to `size` bytes in all."""

    address: int
    data: bytes | memoryview
    size: int
    what: str


def format_size(size: int) -> str:
    for unit, name in ((layout.GiB, "GiB"), (layout.MiB, "MiB"), (layout.KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    if size >= layout.GiB:
        return f"{size / layout.GiB:.1f} GiB"
    if size >= layout.MiB:
        return f"{size / layout.MiB:.1f} MiB"
    return "1 byte" if size == 1 else f"{size} bytes"


def _ram_ranges(memory: GuestMemory) -> str:
    return ", ".join(f"{r.guest_base:#x}-{r.guest_end - 1:#x}" for r in memory.regions) or "none"


def check_range(memory: GuestMemory, address: int, size: int, what: str, *,
                low_start: int = LOW_LOAD_START) -> None:
    """Raise LoaderError unless [address, address+size) may receive kernel/module bytes
    (below 1 MiB: from `low_start` up to the EBDA)."""
    if size <= 0:
        return
    end = address + size
    span = f"{address:#x}-{end - 1:#x}"
    if address < 0 or end > 1 << 64:
        raise LoaderError(f"{what} at {span} is outside the 64-bit physical address space")
    if address < layout.HIGH_MEMORY_START:
        if address < low_start:
            raise LoaderError(
                f"{what} at {span} overlaps pyvmm's boot structures at 0x0-{low_start - 1:#x}"
                f" (below 1 MiB only {low_start:#x}-{LOW_LOAD_END - 1:#x} is free)")
        if end > LOW_LOAD_END:
            raise LoaderError(
                f"{what} at {span} overlaps the reserved area {LOW_LOAD_END:#x}-"
                f"{layout.HIGH_MEMORY_START - 1:#x} (below 1 MiB only {low_start:#x}-"
                f"{LOW_LOAD_END - 1:#x} is free)")
    if memory.contains(address, size):
        return
    for index, region in enumerate(memory.regions):
        if region.contains(address):
            if index == len(memory.regions) - 1:
                raise LoaderError(
                    f"image larger than guest RAM: {what} at {address:#x} needs {format_size(size)}"
                    f" but only {format_size(region.guest_end - address)} of RAM remain above it"
                    f" (guest RAM {format_size(memory.size)}, ends at {region.guest_end:#x})")
            raise LoaderError(
                f"{what} at {span} runs past the end of RAM at {region.guest_end:#x}"
                f" into the memory hole (guest RAM: {_ram_ranges(memory)})")
    top = max((r.guest_end for r in memory.regions), default=0)
    in_hole = layout.LOW_RAM_END <= address < layout.MMIO_HOLE_END
    if address >= top and not in_hole:
        # linked above the end of RAM: more RAM would fix it, so say how much is needed
        raise LoaderError(
            f"image larger than guest RAM: {what} at {span} needs RAM up to {end:#x}"
            f" ({format_size(end)}), guest RAM is {format_size(memory.size)}")
    hole = " in the 32-bit PCI hole" if in_hole else ""
    raise LoaderError(f"{what} at {span} is outside guest RAM{hole} (guest RAM: {_ram_ranges(memory)})")


def check_disjoint(placements: list[Placement]) -> None:
    """Two pieces written to the same guest bytes means a broken image: refuse it."""
    ordered = sorted((p for p in placements if p.size > 0), key=lambda p: p.address)
    for a, b in zip(ordered, ordered[1:]):
        if a.address + a.size > b.address:
            raise LoaderError(
                f"{a.what} ({a.address:#x}-{a.address + a.size - 1:#x}) and {b.what}"
                f" ({b.address:#x}-{b.address + b.size - 1:#x}) overlap")


_ZEROS = memoryview(bytes(1 << 20))


def write_placements(memory: GuestMemory, placements: list[Placement]) -> list[tuple[int, int]]:
    """Copy every placement into guest RAM (already checked); return the ranges written."""
    loaded = []
    try:
        for p in placements:
            if p.size <= 0:
                continue
            memory.load(p.address, p.data)
            # zero the tail chunk by chunk rather than building one huge bytes object
            cursor, remaining = p.address + len(p.data), p.size - len(p.data)
            while remaining > 0:
                n = min(remaining, len(_ZEROS))
                memory.view(cursor, n)[:] = _ZEROS[:n]
                cursor += n
                remaining -= n
            loaded.append((p.address, p.size))
            logger.debug("loaded %s at %#x (%#x bytes, %#x from file)", p.what, p.address, p.size, len(p.data))
    except GuestMemoryError as exc:  # only if RAM changed under us; keep the error type promise
        raise LoaderError(f"cannot write to guest RAM: {exc}") from None
    return loaded


def check_entry(entry: int, placements: list[Placement], what: str = "entry point") -> None:
    """The entry must be inside loaded bytes and reachable through pyvmm's 4 GiB identity map."""
    if entry >= FOUR_GIB:
        raise LoaderError(f"{what} {entry:#x} is above 4 GiB (pyvmm identity-maps only the first 4 GiB)")
    if not any(p.address <= entry < p.address + p.size for p in placements):
        raise LoaderError(f"{what} {entry:#x} is not inside any loaded part of the image")


def boot_state(memory, entry: BootEntry) -> CpuState:
    """The BSP's state at the kernel's entry; APs wait for the kernel's INIT/SIPI."""
    if entry.mode is CpuMode.LONG_64:
        state = boot_tables.long_mode_state(memory, entry.entry)
    else:
        state = boot_tables.protected_mode_state(memory, entry.entry)
    for name, value in entry.registers.items():
        if name not in state.gprs:
            raise ValueError(f"loader asked for unknown register {name!r}")
        state.gprs[name] = value
    return state
