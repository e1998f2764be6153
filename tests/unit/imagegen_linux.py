"""Craft Linux kernel images for loader tests: PVH ELF vmlinux files and bzImages around them.

Written independently of pyvmm.loader (own constants and struct layouts, from
Documentation/arch/x86/boot.rst, bootparam.h and Xen's elfnote.h/start_info.h).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from dataclasses import dataclass, field

EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
SHT_NULL, SHT_PROGBITS, SHT_NOTE, SHT_NOBITS = 0, 1, 7, 8
XEN_ELFNOTE_ENTRY = 1
XEN_ELFNOTE_PHYS32_ENTRY = 18

XLF_KERNEL_64 = 1
XLF_CAN_BE_LOADED_ABOVE_4G = 2
LOADED_HIGH = 1


def pattern(size: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 8)) & 0xFF for i in range(size))


def note(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % align)
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def pvh_note(entry: int, size: int = 8) -> bytes:
    desc = struct.pack("<Q", entry)[:size] if size <= 8 else struct.pack("<Q", entry) + bytes(size - 8)
    return note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, desc)


def linux_notes(entry: int | None, desc_size: int = 8) -> bytes:
    """Notes like a real vmlinux's .notes: other Xen notes, a GNU build id, then the PVH entry."""
    notes = note(b"Xen\0", 6, b"linux\0") + note(b"Xen\0", XEN_ELFNOTE_ENTRY, struct.pack("<Q", 0xFFFFFFFF81000000))
    notes += note(b"GNU\0", 3, pattern(20, 9))
    if entry is not None:
        notes += pvh_note(entry, desc_size)
    notes += note(b"Linux\0", 0x100, b"\x01\x00\x00\x00")
    return notes


@dataclass
class Load:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None


@dataclass
class Vmlinux:
    """An ELF64 x86-64 kernel: PT_LOAD segments, notes in a PT_NOTE segment and/or an SHT_NOTE section."""

    loads: list[Load]
    entry: int
    pvh_entry: int | None
    note_segment: bool = True
    note_section: bool = True
    desc_size: int = 8
    extra_notes: bytes = b""
    sections: bool = True
    machine: int = EM_X86_64
    notes: bytes = field(init=False, default=b"")

    def build(self) -> bytes:
        notes = self.extra_notes + linux_notes(self.pvh_entry, self.desc_size)
        self.notes = notes
        phnum = len(self.loads) + (1 if self.note_segment else 0)
        body_start = 64 + 56 * phnum
        body = bytearray()
        offsets = []
        for load in self.loads:
            body += bytes(-(body_start + len(body)) % 0x1000)  # page-aligned segments like a real vmlinux
            offsets.append(body_start + len(body))
            body += load.data
        body += bytes(-(body_start + len(body)) % 8)
        notes_off = body_start + len(body)
        body += notes
        shstrtab = b"\0.text\0.notes\0.shstrtab\0.bss\0"
        shstr_off = body_start + len(body)
        body += shstrtab
        body += bytes(-(body_start + len(body)) % 8)
        shoff = body_start + len(body)

        phdrs = bytearray()
        for load, off in zip(self.loads, offsets):
            memsz = len(load.data) if load.memsz is None else load.memsz
            vaddr = load.paddr + 0xFFFFFFFF80000000 if load.vaddr is None else load.vaddr
            phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 7, off, vaddr, load.paddr, len(load.data), memsz, 0x1000)
        if self.note_segment:
            phdrs += struct.pack("<IIQQQQQQ", PT_NOTE, 4, notes_off, 0, 0, len(notes), len(notes), 4)

        shdrs = b""
        shnum = shstrndx = 0
        if self.sections:
            def sh(name, stype, flags, addr, off, size, align):
                return struct.pack("<IIQQQQIIQQ", name, stype, flags, addr, off, size, 0, 0, align, 0)
            first = self.loads[0]
            entries = [sh(0, SHT_NULL, 0, 0, 0, 0, 0),
                       sh(1, SHT_PROGBITS, 6, first.paddr, offsets[0], len(first.data), 16)]
            if self.note_section:
                entries.append(sh(7, SHT_NOTE, 2, 0, notes_off, len(notes), 4))
            entries.append(sh(14, 3, 0, 0, shstr_off, len(shstrtab), 1))
            shdrs = b"".join(entries)
            shnum, shstrndx = len(entries), len(entries) - 1
        else:
            shoff = 0

        ident = b"\x7fELF\x02\x01\x01" + bytes(9)
        ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, self.machine, 1, self.entry, 64, shoff, 0,
                           64, 56, phnum, 64, shnum, shstrndx)
        return ehdr + bytes(phdrs) + bytes(body) + shdrs


def small_vmlinux(base: int = 0x1000000, *, pvh: bool = True, **kw) -> bytes:
    """A tiny vmlinux at `base`: text (with the PVH entry at +0x40), data, bss."""
    text, data = pattern(0x1800, 1), pattern(0x900, 2)
    loads = [Load(base, text), Load(base + 0x200000, data, memsz=0x4000)]
    return Vmlinux(loads, entry=base, pvh_entry=base + 0x40 if pvh else None, **kw).build()


# --- compression like the kernel's build (scripts/Makefile.lib) ---------------------------------

def size_trailer(raw: bytes) -> bytes:
    return struct.pack("<I", len(raw))


def lz4_legacy(raw: bytes, block: int = 8 << 20) -> bytes:
    import lz4.block

    out = bytearray(struct.pack("<I", 0x184C2102))
    for i in range(0, len(raw), block):
        chunk = lz4.block.compress(raw[i:i + block], store_size=False, mode="high_compression")
        out += struct.pack("<I", len(chunk)) + chunk
    return bytes(out)


def compress(raw: bytes, fmt: str) -> bytes:
    """A payload as the kernel build makes it: compressed data, then (except gzip) the size."""
    if fmt == "gzip":
        return gzip.compress(raw, 9, mtime=0)  # the gzip trailer's ISIZE is the size
    if fmt == "bzip2":
        data = bz2.compress(raw, 9)
    elif fmt == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
        data = lzma.compress(raw, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    elif fmt == "lzma":
        data = lzma.compress(raw, lzma.FORMAT_ALONE, preset=6)
    elif fmt == "lz4":
        data = lz4_legacy(raw)
    elif fmt == "zstd":
        import zstandard
        data = zstandard.ZstdCompressor(level=19).compress(raw)
    else:
        raise ValueError(fmt)
    return data + size_trailer(raw)


# --- bzImage ---------------------------------------------------------------------------------

@dataclass
class BzImage:
    """A bzImage: boot sector + setup sectors (header at 0x1f1), then the protected-mode kernel.

    The protected-mode kernel is a stub "decompressor" (0x300 bytes), the payload, and a tail.
    """

    payload: bytes
    version: int = 0x020F
    setup_sects: int = 4
    loadflags: int = LOADED_HIGH
    xloadflags: int = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    relocatable: bool = True
    kernel_alignment: int = 0x200000
    pref_address: int = 0x1000000
    init_size: int | None = None      # default: protected-mode kernel size + 1 MiB
    initrd_addr_max: int = 0x7FFFFFFF
    cmdline_size: int = 2047
    kernel_version: str = "6.9.0-pyvmm-test (test@example) #1 SMP"
    syssize: int | None = None
    boot_flag: int = 0xAA55
    payload_offset: int | None = None
    payload_length: int | None = None

    def protected_mode_kernel(self) -> bytes:
        stub = pattern(0x300, 5)
        pm = stub + self.payload + pattern(0x123, 6)
        return pm + bytes(-len(pm) % 16)

    def build(self) -> bytes:
        pm = self.protected_mode_kernel()
        setup = bytearray((self.setup_sects + 1) * 512)
        setup[0x1F1] = self.setup_sects
        struct.pack_into("<I", setup, 0x1F4, len(pm) // 16 if self.syssize is None else self.syssize)
        struct.pack_into("<H", setup, 0x1FE, self.boot_flag)
        setup[0x200] = 0xEB
        setup[0x201] = 0x6A  # header runs to 0x26c (kernel_info_offset included)
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, self.version)
        version_at = 0x400  # in the setup sectors, pointer relative to 0x200
        raw_version = self.kernel_version.encode() + b"\0"
        if version_at + len(raw_version) <= len(setup):
            setup[version_at:version_at + len(raw_version)] = raw_version
            struct.pack_into("<H", setup, 0x20E, version_at - 0x200)
        setup[0x211] = self.loadflags
        struct.pack_into("<I", setup, 0x214, 0x100000)          # code32_start
        struct.pack_into("<I", setup, 0x22C, self.initrd_addr_max)
        struct.pack_into("<I", setup, 0x230, self.kernel_alignment)
        setup[0x234] = int(self.relocatable)
        setup[0x235] = 21
        struct.pack_into("<H", setup, 0x236, self.xloadflags)
        struct.pack_into("<I", setup, 0x238, self.cmdline_size)
        offset = 0x300 if self.payload_offset is None else self.payload_offset
        length = len(self.payload) if self.payload_length is None else self.payload_length
        struct.pack_into("<II", setup, 0x248, offset, length)
        struct.pack_into("<Q", setup, 0x258, self.pref_address)
        init_size = len(pm) + (1 << 20) if self.init_size is None else self.init_size
        struct.pack_into("<I", setup, 0x260, init_size)
        return bytes(setup) + pm

    @property
    def setup_size(self) -> int:
        return (self.setup_sects + 1) * 512


def bzimage(vmlinux: bytes, fmt: str = "gzip", *, relocs: bytes = b"", **kw) -> bytes:
    """A bzImage whose payload is `vmlinux` (+ `relocs`, as a relocatable kernel's build appends)."""
    return BzImage(compress(vmlinux + relocs, fmt), **kw).build()
