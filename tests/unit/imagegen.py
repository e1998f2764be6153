"""Craft kernel images for loader tests: ELF32/ELF64 executables, Multiboot headers, a.out kludge.

Written independently of pyvmm.loader (own constants, own struct layouts) so the
tests check the loader against the formats, not against itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_NULL, PT_LOAD, PT_NOTE = 0, 1, 4
ET_REL, ET_EXEC, ET_DYN = 1, 2, 3
EM_386, EM_X86_64 = 3, 62

MB_MAGIC = 0x1BADB002
MB_PAGE_ALIGN = 1 << 0
MB_MEMORY_INFO = 1 << 1
MB_VIDEO_MODE = 1 << 2
MB_AOUT_KLUDGE = 1 << 16

EHDR_SIZE = {32: 52, 64: 64}
PHDR_SIZE = {32: 32, 64: 56}


@dataclass
class Seg:
    """One program header and the bytes it points at (placed by `elf`)."""

    paddr: int
    data: bytes = b""
    memsz: int | None = None      # default: len(data), i.e. no bss
    vaddr: int | None = None      # default: paddr
    type: int = PT_LOAD
    offset: int | None = None     # override p_offset (default: where `elf` put the data)
    filesz: int | None = None     # override p_filesz (default: len(data))


def elf(bits: int, segments: list[Seg], entry: int, *, machine: int | None = None, etype: int = ET_EXEC,
        ei_class: int | None = None, ei_data: int = 1, phentsize: int | None = None,
        phnum: int | None = None, phoff: int | None = None) -> bytes:
    """An ELF executable: header, program headers, then each segment's data (16-byte aligned).

    The file ends with the last segment's data, so any truncation cuts into a segment.
    """
    assert bits in (32, 64)
    machine = (EM_386 if bits == 32 else EM_X86_64) if machine is None else machine
    ei_class = (1 if bits == 32 else 2) if ei_class is None else ei_class
    ehsize, phsize = EHDR_SIZE[bits], PHDR_SIZE[bits]
    table = ehsize if phoff is None else phoff
    body_start = ehsize + phsize * len(segments)

    offsets, body = [], bytearray()
    for seg in segments:
        pad = (-(body_start + len(body))) % 16
        body += bytes(pad)
        offsets.append(body_start + len(body))
        body += seg.data

    phdrs = bytearray()
    for seg, off in zip(segments, offsets):
        p_offset = off if seg.offset is None else seg.offset
        filesz = len(seg.data) if seg.filesz is None else seg.filesz
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        vaddr = seg.paddr if seg.vaddr is None else seg.vaddr
        if bits == 32:
            phdrs += struct.pack("<IIIIIIII", seg.type, p_offset, vaddr, seg.paddr, filesz, memsz, 7, 16)
        else:
            phdrs += struct.pack("<IIQQQQQQ", seg.type, 7, p_offset, vaddr, seg.paddr, filesz, memsz, 16)

    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1, 0]) + bytes(8)
    e_phnum = len(segments) if phnum is None else phnum
    e_phentsize = phsize if phentsize is None else phentsize
    if bits == 32:
        ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, etype, machine, 1, entry, table, 0, 0,
                           ehsize, e_phentsize, e_phnum, 40, 0, 0)
    else:
        ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, etype, machine, 1, entry, table, 0, 0,
                           ehsize, e_phentsize, e_phnum, 64, 0, 0)
    return ehdr + bytes(phdrs) + bytes(body)


def elf32(segments: list[Seg], entry: int, **kw) -> bytes:
    return elf(32, segments, entry, **kw)


def elf64(segments: list[Seg], entry: int, **kw) -> bytes:
    return elf(64, segments, entry, **kw)


def segment_offset(image: bytes, index: int) -> int:
    """p_offset of program header `index` of an image made by `elf` (to patch its data)."""
    if image[4] == 1:
        phoff = struct.unpack_from("<I", image, 28)[0]
        return struct.unpack_from("<I", image, phoff + 32 * index + 4)[0]
    phoff = struct.unpack_from("<Q", image, 32)[0]
    return struct.unpack_from("<Q", image, phoff + 56 * index + 8)[0]


def multiboot_header(flags: int = MB_PAGE_ALIGN | MB_MEMORY_INFO, *, checksum: int | None = None,
                     aout: tuple[int, int, int, int, int] | None = None,
                     video: tuple[int, int, int, int] | None = None) -> bytes:
    """magic, flags, checksum [, header/load/load_end/bss_end/entry addr [, video fields]]."""
    if checksum is None:
        checksum = (-(MB_MAGIC + flags)) & 0xFFFFFFFF
    header = struct.pack("<III", MB_MAGIC, flags, checksum)
    if aout is not None or video is not None:
        header += struct.pack("<IIIII", *(aout or (0, 0, 0, 0, 0)))
    if video is not None:
        header += struct.pack("<IIII", *video)
    return header


def multiboot_elf(code: bytes, *, bits: int = 32, flags: int = MB_PAGE_ALIGN | MB_MEMORY_INFO,
                  paddr: int = 0x100000, vaddr: int | None = None, bss: int = 0,
                  header_offset: int = 0, extra: tuple[Seg, ...] = (), checksum: int | None = None) -> bytes:
    """A Multiboot ELF kernel: the header leads its first segment, code follows, entry at the code."""
    lead = bytes(header_offset) + multiboot_header(flags, checksum=checksum)
    data = lead + code
    vbase = paddr if vaddr is None else vaddr
    seg = Seg(paddr, data, memsz=len(data) + bss, vaddr=vbase)
    return elf(bits, [seg, *extra], vbase + len(lead))


AOUT_HEADER_SIZE = 32


def aout_image(load_addr: int, payload: bytes, *, header_offset: int = 0, bss: int = 0,
               entry: int | None = None, flags: int = MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_AOUT_KLUDGE,
               load_end: int | None = None, bss_end: int | None = None,
               header_addr: int | None = None) -> bytes:
    """A raw a.out-kludge image: `header_offset` filler bytes, the 32-byte header, the payload.

    The whole file loads at `load_addr`; by default load_end_addr is the end of the file,
    bss_end_addr covers `bss` more bytes (0 when there is none), entry is the payload start.
    """
    filler = bytes((i * 7 + 1) & 0xFF for i in range(header_offset))
    size = header_offset + AOUT_HEADER_SIZE + len(payload)
    h_addr = load_addr + header_offset if header_addr is None else header_addr
    l_end = load_addr + size if load_end is None else load_end
    b_end = (load_addr + size + bss if bss else 0) if bss_end is None else bss_end
    e_addr = load_addr + header_offset + AOUT_HEADER_SIZE if entry is None else entry
    # 32-bit fields: let out-of-range requests wrap as they would in a real header
    fields = tuple(v & 0xFFFFFFFF for v in (h_addr, load_addr, l_end, b_end, e_addr))
    header = multiboot_header(flags, aout=fields)
    assert len(header) == AOUT_HEADER_SIZE
    return filler + header + payload


def pattern(size: int, seed: int = 1) -> bytes:
    """Recognisable non-zero bytes, different per seed."""
    return bytes(((i * 31 + seed * 17) % 251) + 1 for i in range(size))
