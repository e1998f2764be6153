"""ELF32 (i386) and ELF64 (x86-64) executables: PT_LOAD segments go at their physical address."""

from __future__ import annotations

import logging
import mmap
import struct
from dataclasses import dataclass

from ..memory.guest_memory import GuestMemory
from .entry import (
    FOUR_GIB,
    LOW_LOAD_START,
    BootEntry,
    CpuMode,
    LoaderError,
    Placement,
    check_disjoint,
    check_entry,
    check_range,
    write_placements,
)

logger = logging.getLogger(__name__)

# A kernel file's bytes: read into memory, or mapped (a large vmlinux).
ImageBytes = bytes | mmap.mmap

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
PN_XNUM = 0xFFFF

_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")  # 52 bytes
_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")  # 64 bytes
_PHDR32 = struct.Struct("<IIIIIIII")          # type offset vaddr paddr filesz memsz flags align
_PHDR64 = struct.Struct("<IIQQQQQQ")          # type flags offset vaddr paddr filesz memsz align

_TYPE_NAMES = {0: "ET_NONE", ET_REL: "ET_REL (relocatable object)", ET_EXEC: "ET_EXEC",
               ET_DYN: "ET_DYN", ET_CORE: "ET_CORE (core dump)"}
_MACHINE_NAMES = {0: "none", 2: "SPARC", 3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64",
                  40: "ARM", 62: "x86-64", 183: "AArch64", 243: "RISC-V"}


@dataclass(frozen=True)
class ElfSegment:
    index: int  # program header number, for messages
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    bits: int                 # 32 or 64
    type: int
    entry: int                # e_entry as written in the file
    segments: list[ElfSegment]   # PT_LOAD segments with p_memsz > 0


def is_elf(data: ImageBytes) -> bool:
    return data[:4] == ELF_MAGIC


def _machine_name(machine: int) -> str:
    return _MACHINE_NAMES.get(machine, f"machine {machine}")


def parse_elf(data: ImageBytes) -> ElfImage:
    """Validate the headers of an x86 ELF executable and return its loadable segments."""
    if len(data) < 16 or not is_elf(data):
        raise LoaderError("not an ELF file (bad magic)")
    ei_class, ei_data, ei_version = data[4], data[5], data[6]
    if ei_class not in (ELFCLASS32, ELFCLASS64):
        raise LoaderError(f"unknown ELF class {ei_class} (expected 1 for ELF32 or 2 for ELF64)")
    if ei_data == ELFDATA2MSB:
        raise LoaderError("big-endian ELF is not supported (x86 kernels are little-endian)")
    if ei_data != ELFDATA2LSB:
        raise LoaderError(f"unknown ELF data encoding {ei_data}")
    if ei_version != 1:
        raise LoaderError(f"unknown ELF version {ei_version}")
    bits = 32 if ei_class == ELFCLASS32 else 64
    ehdr_struct, phdr_struct = (_EHDR32, _PHDR32) if bits == 32 else (_EHDR64, _PHDR64)
    if len(data) < ehdr_struct.size:
        raise LoaderError(f"truncated ELF{bits} header ({len(data)} of {ehdr_struct.size} bytes)")
    (_, e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum,
     _, _, _) = ehdr_struct.unpack_from(data)

    expected = EM_386 if bits == 32 else EM_X86_64
    if e_machine != expected:
        raise LoaderError(f"ELF{bits} image is for {_machine_name(e_machine)}, "
                          f"expected {_machine_name(expected)}")
    if e_type == ET_DYN:
        # no relocation: a position-independent kernel is loaded where its headers say
        logger.info("ET_DYN image: loading its segments at their p_paddr without relocation")
    elif e_type != ET_EXEC:
        raise LoaderError(f"ELF type {_TYPE_NAMES.get(e_type, e_type)} is not an executable")

    if e_phnum == 0:
        raise LoaderError("ELF image has no program headers (no PT_LOAD segment)")
    if e_phnum == PN_XNUM:
        raise LoaderError("ELF image uses extended program header numbering (too many headers)")
    if e_phentsize < phdr_struct.size:
        raise LoaderError(f"ELF program header size {e_phentsize} is smaller than {phdr_struct.size}")
    table_end = e_phoff + e_phnum * e_phentsize
    if table_end > len(data):
        raise LoaderError(f"ELF program header table ({e_phnum} x {e_phentsize} bytes at offset "
                          f"{e_phoff:#x}) extends past the end of the file ({len(data):#x} bytes)")

    segments = []
    for index in range(e_phnum):
        fields = phdr_struct.unpack_from(data, e_phoff + index * e_phentsize)
        if bits == 32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _, _ = fields
        else:
            p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = fields
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise LoaderError(f"ELF segment {index}: file size {p_filesz:#x} exceeds memory size {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise LoaderError(f"ELF segment {index} (offset {p_offset:#x}, {p_filesz:#x} bytes) extends "
                              f"past the end of the file ({len(data):#x} bytes)")
        if bits == 32 and p_paddr + p_memsz > FOUR_GIB:
            raise LoaderError(f"ELF32 segment {index} at {p_paddr:#x} (+{p_memsz:#x}) runs past 4 GiB")
        if p_memsz == 0:
            continue
        segments.append(ElfSegment(index, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz))
    if not segments:
        raise LoaderError("ELF image has no non-empty PT_LOAD segment")
    return ElfImage(bits, e_type, e_entry, segments)


def entry_physical(image: ElfImage) -> int:
    """e_entry as a physical address.

    e_entry is normally virtual: translate through the segment containing it.  Some
    kernels (Linux's vmlinux, higher-half multiboot kernels) store the physical entry
    instead; accept that when it falls inside a segment's physical range.
    """
    for seg in image.segments:
        if seg.vaddr <= image.entry < seg.vaddr + seg.memsz:
            return image.entry - seg.vaddr + seg.paddr
    for seg in image.segments:
        if seg.paddr <= image.entry < seg.paddr + seg.memsz:
            return image.entry
    raise LoaderError(f"ELF entry point {image.entry:#x} is not inside any PT_LOAD segment")


def plan_elf(memory: GuestMemory, data: ImageBytes, image: ElfImage, *,
             low_start: int = LOW_LOAD_START) -> list[Placement]:
    """Where each segment goes, checked against RAM, pyvmm's boot area and each other."""
    view = memoryview(data)
    placements = []
    for seg in image.segments:
        what = f"ELF segment {seg.index}"
        check_range(memory, seg.paddr, seg.memsz, what, low_start=low_start)
        placements.append(Placement(seg.paddr, view[seg.offset:seg.offset + seg.filesz], seg.memsz, what))
    check_disjoint(placements)
    return placements


def load_elf(memory: GuestMemory, data: ImageBytes) -> BootEntry:
    """Load an ELF32/ELF64 executable; the CPU enters it in 32-bit protected or 64-bit mode."""
    image = parse_elf(data)
    placements = plan_elf(memory, data, image)
    entry = entry_physical(image)
    check_entry(entry, placements)
    loaded = write_placements(memory, placements)
    mode = CpuMode.PROTECTED_32 if image.bits == 32 else CpuMode.LONG_64
    logger.info("ELF%d kernel: %d segment(s), entry %#x", image.bits, len(loaded), entry)
    return BootEntry(mode=mode, entry=entry, kind=f"ELF{image.bits} kernel", loaded=loaded)
