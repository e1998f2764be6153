"""Multiboot 1 (specification 0.6.96): header, a.out kludge or ELF image, information structure.

The information structure, its memory map, module list and strings all live in
layout.MULTIBOOT_INFO .. layout.CMDLINE-1; the command line sits at layout.CMDLINE.
A kernel may load anywhere in low memory from 0x1000 (test kernels put real-mode
trampolines at 0x8000): when it covers that area, the information structure and the
command line move to the lowest free gap instead (below the EBDA, else above the
kernel and its modules), as QEMU's loader also places them where the image is not.
Modules are loaded page-aligned above the kernel's highest byte.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..arch.x86_64 import layout
from ..memory.guest_memory import GuestMemory, GuestMemoryError
from . import elf
from .entry import (
    FOUR_GIB,
    LOW_LOAD_END,
    MULTIBOOT_LOW_LOAD_START,
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

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002   # in EAX at entry
SEARCH_LIMIT = 8192             # the header must lie entirely in the first 8 KiB
PAGE = 4096

# header flags
HF_PAGE_ALIGN = 1 << 0          # modules on 4 KiB boundaries: always done
HF_MEMORY_INFO = 1 << 1         # mem_* fields: always provided
HF_VIDEO_MODE = 1 << 2          # a preferred video mode: "if possible", pyvmm has no framebuffer
HF_AOUT_KLUDGE = 1 << 16        # load from the address fields instead of ELF headers
HF_SUPPORTED_REQUIRED = HF_PAGE_ALIGN | HF_MEMORY_INFO | HF_VIDEO_MODE

# information structure flags
MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_BOOT_LOADER_NAME = 1 << 9

MBI_SIZE = 0x80                 # 116 bytes in 0.6.96 (up to the framebuffer fields), rounded up
MBI_OFF_FLAGS = 0
MBI_OFF_MEM_LOWER = 4
MBI_OFF_MEM_UPPER = 8
MBI_OFF_CMDLINE = 16
MBI_OFF_MODS_COUNT = 20
MBI_OFF_MODS_ADDR = 24
MBI_OFF_MMAP_LENGTH = 44
MBI_OFF_MMAP_ADDR = 48
MBI_OFF_BOOT_LOADER_NAME = 64
MMAP_ENTRY = struct.Struct("<IQQI")  # size (=20, excludes itself), base_addr, length, type
MODULE_ENTRY = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved
BOOT_LOADER_NAME = b"pyvmm"

_HEADER = struct.Struct("<III")
_AOUT = struct.Struct("<IIIII")  # header_addr load_addr load_end_addr bss_end_addr entry_addr


@dataclass(frozen=True)
class MultibootHeader:
    offset: int                 # file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(data: bytes) -> MultibootHeader | None:
    """The Multiboot header in the first 8 KiB, None if there is no magic there.

    A magic with a wrong checksum is an error rather than "not multiboot": falling back
    to plain ELF would boot the kernel without the information it expects.
    """
    limit = min(len(data), SEARCH_LIMIT)
    bad_checksum_at = None
    for offset in range(0, limit - _HEADER.size + 1, 4):
        magic, flags, checksum = _HEADER.unpack_from(data, offset)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:
            if bad_checksum_at is None:
                bad_checksum_at = offset
            continue
        header = MultibootHeader(offset, flags)
        if flags & HF_AOUT_KLUDGE:
            if offset + _HEADER.size + _AOUT.size > limit:
                raise LoaderError(f"Multiboot header at offset {offset:#x} is cut off: its address fields "
                                  f"end past byte {limit} (file end or the {SEARCH_LIMIT}-byte search limit)")
            header = MultibootHeader(offset, flags, *_AOUT.unpack_from(data, offset + _HEADER.size))
        return header
    if bad_checksum_at is not None:
        raise LoaderError(f"Multiboot header at offset {bad_checksum_at:#x} has a bad checksum")
    return None


def check_header_flags(header: MultibootHeader) -> None:
    required = header.flags & 0xFFFF
    unsupported = required & ~HF_SUPPORTED_REQUIRED
    if unsupported:
        raise LoaderError(f"Multiboot header requires features pyvmm does not support "
                          f"(flags {header.flags:#010x}, unknown required bits {unsupported:#06x})")
    if header.flags & HF_VIDEO_MODE:
        logger.warning("Multiboot kernel asks for a video mode; pyvmm has no framebuffer, ignoring it")
    optional = header.flags & ~0xFFFF & ~HF_AOUT_KLUDGE
    if optional:
        logger.debug("ignoring optional Multiboot header flags %#x", optional)


def plan_aout(memory: GuestMemory, data: bytes, h: MultibootHeader) -> tuple[list[Placement], int]:
    """Placements for an a.out-kludge image and its entry address."""
    if h.load_addr > h.header_addr:
        raise LoaderError(f"Multiboot load_addr {h.load_addr:#x} is above header_addr {h.header_addr:#x}")
    start = h.offset - (h.header_addr - h.load_addr)  # file offset that load_addr corresponds to
    if start < 0:
        raise LoaderError(f"Multiboot header_addr - load_addr = {h.header_addr - h.load_addr:#x} "
                          f"but the header is at file offset {h.offset:#x}")
    if h.load_end_addr:
        if h.load_end_addr <= h.header_addr:
            raise LoaderError(f"Multiboot load_end_addr {h.load_end_addr:#x} is not above "
                              f"header_addr {h.header_addr:#x}")
        text_size = h.load_end_addr - h.load_addr
        if start + text_size > len(data):
            raise LoaderError(f"Multiboot load range {h.load_addr:#x}-{h.load_end_addr - 1:#x} needs "
                              f"{text_size:#x} bytes from file offset {start:#x}, the file has {len(data):#x}")
    else:
        text_size = len(data) - start  # 0 means "load to the end of the file"
    load_end = h.load_addr + text_size
    if load_end > FOUR_GIB:
        raise LoaderError(f"Multiboot image at {h.load_addr:#x} (+{text_size:#x}) runs past 4 GiB")
    if h.bss_end_addr and h.bss_end_addr < load_end:
        raise LoaderError(f"Multiboot bss_end_addr {h.bss_end_addr:#x} is below the end of the "
                          f"loaded image {load_end:#x}")
    total = (h.bss_end_addr or load_end) - h.load_addr
    what = "Multiboot image"
    check_range(memory, h.load_addr, total, what, low_start=MULTIBOOT_LOW_LOAD_START)
    placement = Placement(h.load_addr, memoryview(data)[start:start + text_size], total, what)
    return [placement], h.entry_addr


@dataclass(frozen=True)
class Module:
    path: str
    string: bytes               # path and arguments, as the kernel sees them
    data: bytes


def parse_module_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """"path args..." -> (path, args); a PathLike is a path without arguments."""
    if isinstance(spec, os.PathLike):
        return os.fspath(spec), ""
    parts = str(spec).strip().split(None, 1)
    if not parts:
        raise LoaderError("empty module specification")
    return parts[0], parts[1] if len(parts) > 1 else ""


def read_modules(modules: Sequence[str | os.PathLike]) -> list[Module]:
    result = []
    for spec in modules:
        path, args = parse_module_spec(spec)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise LoaderError(f"module {path}: cannot read: {exc.strerror or exc}") from None
        text = f"{path} {args}" if args else path
        string = text.encode("utf-8", "surrogateescape")
        if b"\0" in string:
            raise LoaderError(f"module {path}: its string contains a NUL byte")
        result.append(Module(path, string, data))
    return result


def plan_modules(memory: GuestMemory, modules: list[Module], kernel_end: int) -> tuple[list[Placement], list[tuple[int, int]]]:
    """Page-aligned module placements above the kernel; returns them and (mod_start, mod_end) pairs."""
    cursor = _align_up(max(kernel_end, layout.HIGH_MEMORY_START), PAGE)
    placements, ranges = [], []
    for module in modules:
        size = len(module.data)
        what = f"module {module.path}"
        if cursor + size > FOUR_GIB:
            raise LoaderError(f"{what} ({size:#x} bytes at {cursor:#x}) does not fit below 4 GiB")
        check_range(memory, cursor, size, what, low_start=MULTIBOOT_LOW_LOAD_START)
        placements.append(Placement(cursor, module.data, size, what))
        ranges.append((cursor, cursor + size))
        cursor = _align_up(cursor + size, PAGE)
    return placements, ranges


def memory_info(e820: Sequence[layout.E820Entry]) -> tuple[int, int]:
    """(mem_lower, mem_upper) in KiB: RAM from 0 (up to 640 KiB) and contiguous RAM from 1 MiB."""
    ram = sorted((e.address, e.address + e.size) for e in e820 if e.kind == layout.E820Entry.RAM)
    lower = 0
    for start, end in ram:
        if start == 0:
            lower = min(end, 640 * layout.KiB) // layout.KiB
    cursor = layout.HIGH_MEMORY_START
    for start, end in ram:
        if start <= cursor < end:
            cursor = end
    upper = (cursor - layout.HIGH_MEMORY_START) // layout.KiB
    return lower, min(upper, 0xFFFFFFFF)


def build_info(memory_size: int, cmdline_addr: int, mod_entries: list[tuple[int, int, bytes]],
               base: int = layout.MULTIBOOT_INFO, limit: int = layout.CMDLINE) -> bytes:
    """The information structure and everything it points to, as bytes for `base` (up to `limit`)."""
    e820 = layout.e820_map(memory_size)
    mem_lower, mem_upper = memory_info(e820)

    mmap_addr = base + MBI_SIZE
    mmap = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, e.address, e.size, e.kind) for e in e820)
    mods_addr = _align_up(mmap_addr + len(mmap), 16)
    strings_addr = mods_addr + MODULE_ENTRY.size * len(mod_entries)

    strings = bytearray(BOOT_LOADER_NAME + b"\0")
    mods = bytearray()
    for start, end, string in mod_entries:
        mods += MODULE_ENTRY.pack(start, end, strings_addr + len(strings), 0)
        strings += string + b"\0"

    end = strings_addr + len(strings)
    if end > limit:
        raise LoaderError(f"Multiboot information ({end - base} bytes with {len(mod_entries)} modules) "
                          f"does not fit in {limit - base} bytes at {base:#x}")

    info = bytearray(end - base)
    flags = MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_BOOT_LOADER_NAME
    struct.pack_into("<III", info, MBI_OFF_FLAGS, flags, mem_lower, mem_upper)
    struct.pack_into("<III", info, MBI_OFF_CMDLINE, cmdline_addr, len(mod_entries), mods_addr)
    struct.pack_into("<II", info, MBI_OFF_MMAP_LENGTH, len(mmap), mmap_addr)
    struct.pack_into("<I", info, MBI_OFF_BOOT_LOADER_NAME, strings_addr)
    info[mmap_addr - base:mmap_addr - base + len(mmap)] = mmap
    info[mods_addr - base:mods_addr - base + len(mods)] = mods
    info[strings_addr - base:] = strings
    return bytes(info)


def encode_cmdline(cmdline: str) -> bytes:
    raw = cmdline.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise LoaderError("kernel command line contains a NUL byte")
    if len(raw) + 1 > layout.CMDLINE_MAX:
        raise LoaderError(f"kernel command line is {len(raw)} bytes, the limit is {layout.CMDLINE_MAX - 1}")
    return raw + b"\0"


def load_multiboot(memory: GuestMemory, data: bytes, header: MultibootHeader | None = None, *,
                   cmdline: str = "", modules: Sequence[str | os.PathLike] = ()) -> BootEntry:
    """Load a Multiboot 1 kernel, its modules and the information structure."""
    if header is None:
        header = find_header(data)
        if header is None:
            raise LoaderError("no Multiboot header in the first 8192 bytes")
    check_header_flags(header)
    if header.flags & HF_AOUT_KLUDGE:
        placements, entry = plan_aout(memory, data, header)
        kind = "Multiboot a.out-kludge kernel"
    else:
        if not elf.is_elf(data):
            raise LoaderError("Multiboot header without the a.out kludge (flag bit 16) needs an ELF image")
        image = elf.parse_elf(data)
        placements = elf.plan_elf(memory, data, image, low_start=MULTIBOOT_LOW_LOAD_START)
        entry = elf.entry_physical(image)
        kind = f"Multiboot ELF{image.bits} kernel"
    check_entry(entry, placements)

    raw_cmdline = encode_cmdline(cmdline)
    kernel_end = max(p.address + p.size for p in placements)
    mods = read_modules(modules)
    module_placements, ranges = plan_modules(memory, mods, kernel_end)
    check_disjoint(placements + module_placements)
    mod_entries = [(start, end, m.string) for (start, end), m in zip(ranges, mods)]
    info_addr, cmdline_addr, info = place_info(memory, placements + module_placements, raw_cmdline, mod_entries)

    loaded = write_placements(memory, placements)
    loaded += write_placements(memory, module_placements)
    try:
        memory.write(info_addr, info)
        memory.write(cmdline_addr, raw_cmdline)
    except GuestMemoryError as exc:
        raise LoaderError(f"cannot write the Multiboot information: {exc}") from None
    logger.info("%s: entry %#x, %d module(s), info at %#x", kind, entry, len(ranges), info_addr)
    return BootEntry(mode=CpuMode.PROTECTED_32, entry=entry,
                     registers={"rax": BOOTLOADER_MAGIC, "rbx": info_addr},
                     kind=kind, loaded=loaded, cmdline=cmdline)


def place_info(memory: GuestMemory, placements: list[Placement], raw_cmdline: bytes,
               mod_entries: list[tuple[int, int, bytes]]) -> tuple[int, int, bytes]:
    """(info address, command line address, info bytes): at layout.MULTIBOOT_INFO and
    layout.CMDLINE unless the image covers them, else in the lowest free gap that holds both."""
    used = sorted((p.address, p.address + p.size) for p in placements if p.size > 0)

    def free(start: int, end: int) -> bool:
        return all(e <= start or s >= end for s, e in used)

    if free(layout.MULTIBOOT_INFO, layout.CMDLINE + len(raw_cmdline)):
        return layout.MULTIBOOT_INFO, layout.CMDLINE, build_info(memory.size, layout.CMDLINE, mod_entries)
    size = len(build_info(memory.size, layout.CMDLINE, mod_entries))  # the size does not depend on the address
    needed = _align_up(size, 16) + len(raw_cmdline)
    candidates = [MULTIBOOT_LOW_LOAD_START] + [_align_up(e, PAGE) for _, e in used]
    for start in sorted(candidates):
        end = start + needed
        low = start < LOW_LOAD_END
        if (low and end > LOW_LOAD_END) or end > FOUR_GIB or not memory.contains(start, needed):
            continue
        if free(start, end):
            cmdline_addr = start + _align_up(size, 16)
            return start, cmdline_addr, build_info(memory.size, cmdline_addr, mod_entries, base=start, limit=cmdline_addr)
    raise LoaderError(f"no room for the Multiboot information and command line ({needed} bytes): the kernel "
                      f"and modules leave no free gap in RAM below {LOW_LOAD_END:#x} or above them below 4 GiB")


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
