"""PVH direct boot of an uncompressed ELF vmlinux.

The kernel advertises a 32-bit physical entry point in a Xen ELF note
(XEN_ELFNOTE_PHYS32_ENTRY = 18, in PT_NOTE segments or SHT_NOTE sections).  pyvmm
loads the PT_LOAD segments at their physical addresses, writes struct hvm_start_info
(include/xen/interface/hvm/start_info.h, version 1) with a memory map, the command
line and the initrd as module 0, and enters the kernel in flat 32-bit protected mode,
paging off, with EBX = the start info's address.
"""

from __future__ import annotations

import logging
import struct

from ...arch.x86_64 import layout
from ...memory.guest_memory import GuestMemory, GuestMemoryError
from .. import elf
from ..elf import ImageBytes
from ..entry import FOUR_GIB, BootEntry, CpuMode, LoaderError, Placement, check_disjoint, check_entry, write_placements
from .bzimage import e820_entries, encode_cmdline, place_initrd

logger = logging.getLogger(__name__)

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen\0"
PT_NOTE = 4
SHT_NOTE = 7
SHT_NOBITS = 8

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
START_INFO = struct.Struct("<IIIIQQQQII")   # magic version flags nr_modules modlist cmdline rsdp memmap entries reserved
MODLIST_ENTRY = struct.Struct("<QQQQ")      # paddr size cmdline_paddr reserved
MEMMAP_ENTRY = struct.Struct("<QQII")       # addr size type reserved
START_INFO_AREA = 0x1000                    # layout.PVH_START_INFO .. +0xfff
MODLIST_OFFSET = 0x40
MEMMAP_OFFSET = 0x80
LINUX_COMMAND_LINE_SIZE = 2048              # x86 COMMAND_LINE_SIZE, NUL included

_EHDR = {1: struct.Struct("<16sHHIIIIIHHHHHH"), 2: struct.Struct("<16sHHIQQQIHHHHHH")}
_PHDR = {1: struct.Struct("<IIIIIIII"), 2: struct.Struct("<IIQQQQQQ")}
_SHDR = {1: struct.Struct("<IIIIIIIIII"), 2: struct.Struct("<IIQQQQIIQQ")}


class NoPvhNoteError(LoaderError):
    """A valid ELF kernel without a PVH entry note (Linux built without CONFIG_PVH)."""


def _headers(data: ImageBytes) -> tuple[int, tuple]:
    """(ELF class, e_* fields) of a little-endian ELF header; LoaderError if malformed."""
    if len(data) < 16 or bytes(data[:4]) != elf.ELF_MAGIC:
        raise LoaderError("not an ELF file (bad magic)")
    ei_class = data[4]
    if ei_class not in _EHDR:
        raise LoaderError(f"unknown ELF class {ei_class}")
    if data[5] != elf.ELFDATA2LSB:
        raise LoaderError("not a little-endian ELF file")
    if len(data) < _EHDR[ei_class].size:
        raise LoaderError(f"truncated ELF header ({len(data)} bytes)")
    return ei_class, _EHDR[ei_class].unpack_from(data)


def _table(data: ImageBytes, offset: int, count: int, entsize: int, entry: struct.Struct, what: str):
    """Unpacked entries of a program or section header table, bounds-checked."""
    if count == 0:
        return []
    if entsize < entry.size:
        raise LoaderError(f"ELF {what} entry size {entsize} is smaller than {entry.size}")
    if offset + count * entsize > len(data):
        raise LoaderError(f"ELF {what} table ({count} x {entsize} bytes at offset {offset:#x}) extends past "
                          f"the end of the file ({len(data):#x} bytes)")
    return [entry.unpack_from(data, offset + i * entsize) for i in range(count)]


def _notes(data: ImageBytes, offset: int, size: int, align: int):
    """(name, type, desc) of each note in [offset, offset+size)."""
    if offset + size > len(data):
        raise LoaderError(f"ELF note area at offset {offset:#x} (+{size:#x}) extends past the end of the file")
    align = 8 if align == 8 else 4
    pos, end = offset, offset + size
    while end - pos >= 12:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + align - 1) // align * align
        next_at = desc_at + (descsz + align - 1) // align * align
        if desc_at + descsz > end:
            raise LoaderError(f"malformed ELF note at offset {pos:#x}: its name and descriptor run past the "
                              f"note area")
        yield bytes(data[name_at:name_at + namesz]), ntype, bytes(data[desc_at:desc_at + descsz])
        pos = next_at


def _pvh_entry_in(notes) -> int | None:
    for name, ntype, desc in notes:
        if name.rstrip(b"\0") != XEN_NOTE_NAME.rstrip(b"\0") or ntype != XEN_ELFNOTE_PHYS32_ENTRY:
            continue
        if len(desc) == 4:
            value = struct.unpack("<I", desc)[0]
        elif len(desc) == 8:
            value = struct.unpack("<Q", desc)[0]
        else:
            raise LoaderError(f"PVH entry note has a {len(desc)}-byte descriptor (expected 4 or 8)")
        if value >= FOUR_GIB:
            raise LoaderError(f"PVH entry point {value:#x} is above 4 GiB")
        return value
    return None


def find_pvh_entry(data: ImageBytes) -> int | None:
    """The 32-bit physical entry of XEN_ELFNOTE_PHYS32_ENTRY, None if the ELF has no such note."""
    ei_class, h = _headers(data)
    e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum = h[5], h[6], h[9], h[10], h[11], h[12]
    for ph in _table(data, e_phoff, e_phnum, e_phentsize, _PHDR[ei_class], "program header"):
        if ei_class == 1:
            p_type, p_offset, _, _, p_filesz, _, _, p_align = ph
        else:
            p_type, _, p_offset, _, _, p_filesz, _, p_align = ph
        if p_type == PT_NOTE:
            entry = _pvh_entry_in(_notes(data, p_offset, p_filesz, p_align))
            if entry is not None:
                return entry
    if e_shnum and e_shoff:
        for sh in _table(data, e_shoff, e_shnum, e_shentsize, _SHDR[ei_class], "section header"):
            sh_type, sh_offset, sh_size, sh_align = sh[1], sh[4], sh[5], sh[8]
            if sh_type == SHT_NOTE:
                entry = _pvh_entry_in(_notes(data, sh_offset, sh_size, sh_align))
                if entry is not None:
                    return entry
    return None


def elf_extent(data: ImageBytes) -> int:
    """Bytes of `data` that belong to its ELF file: headers, tables, segments and sections.

    A bzImage's payload is vmlinux followed by relocation data; this is where to cut it.
    """
    ei_class, h = _headers(data)
    e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum = h[5], h[6], h[9], h[10], h[11], h[12]
    end = _EHDR[ei_class].size
    for ph in _table(data, e_phoff, e_phnum, e_phentsize, _PHDR[ei_class], "program header"):
        p_offset, p_filesz = (ph[1], ph[4]) if ei_class == 1 else (ph[2], ph[5])
        end = max(end, e_phoff + e_phnum * e_phentsize, p_offset + p_filesz if p_filesz else 0)
    if e_shnum and e_shoff:
        for sh in _table(data, e_shoff, e_shnum, e_shentsize, _SHDR[ei_class], "section header"):
            if sh[1] != SHT_NOBITS and sh[1] != 0:
                end = max(end, sh[4] + sh[5])
        end = max(end, e_shoff + e_shnum * e_shentsize)
    if end > len(data):
        raise LoaderError(f"truncated ELF: its contents end at {end:#x}, the data has {len(data):#x} bytes")
    return end


def verify_vmlinux(data: ImageBytes) -> int:
    """Check an ELF64 x86-64 kernel with a PVH note; return the PVH entry."""
    image = elf.parse_elf(data)
    if image.bits != 64:
        raise LoaderError(f"vmlinux is ELF{image.bits}, expected ELF64")
    entry = find_pvh_entry(data)
    if entry is None:
        raise NoPvhNoteError("vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): "
                             "the kernel was built without CONFIG_PVH")
    return entry


def build_start_info(memory: GuestMemory, *, cmdline_paddr: int, rsdp: int | None,
                     module: tuple[int, int] | None) -> bytes:
    """hvm_start_info, its module list and memory map, as bytes for layout.PVH_START_INFO."""
    base = layout.PVH_START_INFO
    entries = e820_entries(memory)
    area = bytearray(MEMMAP_OFFSET + MEMMAP_ENTRY.size * len(entries))
    if len(area) > START_INFO_AREA:
        raise LoaderError(f"PVH start info with {len(entries)} memory map entries does not fit in "
                          f"{START_INFO_AREA} bytes at {base:#x}")
    nr_modules = 1 if module else 0
    START_INFO.pack_into(area, 0, HVM_START_MAGIC, HVM_START_VERSION, 0, nr_modules,
                         base + MODLIST_OFFSET if module else 0, cmdline_paddr, rsdp or 0,
                         base + MEMMAP_OFFSET, len(entries), 0)
    if module:
        MODLIST_ENTRY.pack_into(area, MODLIST_OFFSET, module[0], module[1], 0, 0)
    for index, e in enumerate(entries):
        MEMMAP_ENTRY.pack_into(area, MEMMAP_OFFSET + index * MEMMAP_ENTRY.size, e.address, e.size, e.kind, 0)
    return bytes(area)


def load_pvh(memory: GuestMemory, data: ImageBytes, *, cmdline: str = "", initrd: bytes | None = None,
             rsdp: int | None = layout.ACPI_RSDP, kind: str = "Linux vmlinux (PVH)") -> BootEntry:
    """Load an ELF kernel with a PVH note, its initrd (module 0) and hvm_start_info.

    `rsdp` is the guest-physical address of the ACPI RSDP (None: the guest has no ACPI tables).
    """
    image = elf.parse_elf(data)
    entry = find_pvh_entry(data)
    if entry is None:
        raise NoPvhNoteError("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    placements = elf.plan_elf(memory, data, image)
    check_entry(entry, placements, "PVH entry point")
    raw_cmdline = encode_cmdline(cmdline, layout.CMDLINE_MAX - 1)
    if len(raw_cmdline) > LINUX_COMMAND_LINE_SIZE:
        logger.warning("command line is %d bytes; Linux keeps only the first %d",
                       len(raw_cmdline) - 1, LINUX_COMMAND_LINE_SIZE - 1)

    module = None
    if initrd is not None:
        kernel = [(p.address, p.address + p.size) for p in placements]
        address = place_initrd(memory, len(initrd), limit=FOUR_GIB, avoid=kernel)
        initrd_placement = Placement(address, initrd, len(initrd), "initrd")
        check_disjoint(placements + [initrd_placement])
        placements.append(initrd_placement)
        module = (address, len(initrd))
    start_info = build_start_info(memory, cmdline_paddr=layout.CMDLINE, rsdp=rsdp, module=module)

    loaded = write_placements(memory, placements)
    try:
        memory.write(layout.PVH_START_INFO, start_info)
        memory.write(layout.CMDLINE, raw_cmdline)
    except GuestMemoryError as exc:
        raise LoaderError(f"cannot write the PVH start info: {exc}") from None
    logger.info("%s: %d segment(s), PVH entry %#x, initrd %s, start info at %#x", kind,
                len(image.segments), entry, f"{module[0]:#x}+{module[1]:#x}" if module else "none",
                layout.PVH_START_INFO)
    return BootEntry(mode=CpuMode.PROTECTED_32, entry=entry, registers={"rbx": layout.PVH_START_INFO},
                     kind=kind, loaded=loaded, cmdline=cmdline)
