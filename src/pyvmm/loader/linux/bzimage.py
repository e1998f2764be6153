"""The Linux x86 boot protocol: bzImage setup header, boot_params (the zero page), 64-bit entry.

References: Documentation/arch/x86/boot.rst, zero-page.rst and
arch/x86/include/uapi/asm/bootparam.h.  pyvmm skips the real-mode setup code and
enters the protected-mode kernel through its 64-bit entry (load address + 0x200)
with RSI pointing at boot_params, as the 64-bit boot protocol (2.12+) allows.

Also here: what every Linux boot path needs, the initrd placement and the command line.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ...arch.x86_64 import layout
from ...memory.guest_memory import GuestMemory, GuestMemoryError
from ..entry import (
    FOUR_GIB,
    BootEntry,
    CpuMode,
    LoaderError,
    Placement,
    check_entry,
    check_range,
    format_size,
    write_placements,
)

logger = logging.getLogger(__name__)

PAGE = 4096
SECTOR = 512
HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
ENTRY_64_OFFSET = 0x200        # startup_64 sits 0x200 bytes into the protected-mode kernel

# Offsets in the boot sector / boot_params (struct setup_header starts at 0x1f1).
OFF_SETUP_SECTS = 0x1F1
OFF_SYSSIZE = 0x1F4
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200               # a short jump; its second byte gives the header's length
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_KERNEL_VERSION = 0x20E
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_EXT_LOADER_VER = 0x226
OFF_EXT_LOADER_TYPE = 0x227
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_MIN_ALIGNMENT = 0x235
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PAYLOAD_OFFSET = 0x248
OFF_PAYLOAD_LENGTH = 0x24C
OFF_SETUP_DATA = 0x250
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
SETUP_HEADER_START = OFF_SETUP_SECTS
SETUP_HEADER_LIMIT = 0x290

# boot_params fields outside the setup header
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type: 20 bytes, packed
BOOT_PARAMS_SIZE = 4096

# loadflags
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

TYPE_OF_LOADER_UNDEFINED = 0xFF
HEAP_END_PTR = 0xFE00          # heap end, as an offset from the real-mode code (unused by the 64-bit entry)

MIN_VERSION_PAYLOAD = 0x0208   # payload_offset / payload_length
MIN_VERSION_64BIT = 0x020C     # xloadflags, the 64-bit entry
MIN_VERSION_RSDP = 0x020E      # acpi_rsdp_addr
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # before protocol 2.03


@dataclass(frozen=True)
class SetupHeader:
    """The parts of a bzImage's setup header pyvmm needs, validated."""

    version: int               # e.g. 0x020f
    setup_sects: int           # 512-byte sectors of real-mode setup after the boot sector
    header_end: int            # 0x202 + jump byte: the setup header is data[0x1f1:header_end]
    syssize: int               # protected-mode kernel size in 16-byte paragraphs
    loadflags: int
    xloadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    min_alignment: int
    cmdline_size: int          # longest command line without its NUL
    payload_offset: int        # within the protected-mode kernel
    payload_length: int
    pref_address: int
    init_size: int
    kernel_version: str        # "" when the image does not carry one

    @property
    def setup_size(self) -> int:
        """File offset of the protected-mode kernel."""
        return (self.setup_sects + 1) * SECTOR

    @property
    def kernel_size(self) -> int:
        """Bytes of the protected-mode kernel (syssize paragraphs)."""
        return self.syssize * 16

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def release(self) -> str:
        """The kernel release ("6.1.0-56-cloud-amd64"), "" if unknown."""
        return self.kernel_version.split(" ", 1)[0]


def is_bzimage(data: bytes) -> bool:
    return len(data) >= OFF_HEADER + 4 and bytes(data[OFF_HEADER:OFF_HEADER + 4]) == HDRS_MAGIC


def _u8(data, off: int) -> int:
    return data[off]


def _u16(data, off: int) -> int:
    return struct.unpack_from("<H", data, off)[0]


def _u32(data, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]


def _u64(data, off: int) -> int:
    return struct.unpack_from("<Q", data, off)[0]


def _version_text(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def parse_setup_header(data: bytes) -> SetupHeader:
    """Validate a bzImage's setup header; every problem is a one-line LoaderError."""
    if not is_bzimage(data):
        raise LoaderError("not a bzImage (no \"HdrS\" magic at offset 0x202)")
    if len(data) < OFF_HEADER + 6:
        raise LoaderError(f"truncated bzImage: {len(data)} bytes end inside the setup header")
    version = _u16(data, OFF_VERSION)
    # struct setup_header is followed by other boot_params fields from 0x290 on
    header_end = min(OFF_HEADER + data[OFF_JUMP + 1], SETUP_HEADER_LIMIT)
    if version < 0x0200:
        raise LoaderError(f"bzImage boot protocol {_version_text(version)} is not a valid version")
    if len(data) < max(header_end, OFF_VERSION + 2) or len(data) < SECTOR:
        raise LoaderError(f"truncated bzImage: {len(data)} bytes end inside the setup header "
                          f"(which ends at {header_end:#x})")
    if _u16(data, OFF_BOOT_FLAG) != BOOT_FLAG:
        raise LoaderError(f"bzImage boot_flag is {_u16(data, OFF_BOOT_FLAG):#06x}, expected 0xaa55")

    def field(off: int, size: int, since: int, default: int = 0) -> int:
        """A header field, or `default` if the protocol version or header length lacks it."""
        if version < since or off + size > header_end:
            return default
        return {1: _u8, 2: _u16, 4: _u32, 8: _u64}[size](data, off)

    setup_sects = data[OFF_SETUP_SECTS] or 4
    loadflags = data[OFF_LOADFLAGS]
    if not loadflags & LOADED_HIGH:
        raise LoaderError("zImage (kernel loaded at 0x10000) is not supported: the LOADED_HIGH loadflag is clear")
    syssize = field(OFF_SYSSIZE, 4, 0x0204, _u16(data, OFF_SYSSIZE))
    setup_size = (setup_sects + 1) * SECTOR
    if setup_size > len(data):
        raise LoaderError(f"truncated bzImage: {setup_sects} setup sectors need {setup_size:#x} bytes, "
                          f"the file has {len(data):#x}")
    kernel_size = syssize * 16
    if kernel_size == 0:
        raise LoaderError("bzImage syssize is 0: there is no protected-mode kernel")
    if setup_size + kernel_size > len(data):
        raise LoaderError(f"truncated bzImage: the protected-mode kernel is {kernel_size:#x} bytes (syssize) "
                          f"from offset {setup_size:#x}, the file has {len(data):#x}")

    kernel_alignment = field(OFF_KERNEL_ALIGNMENT, 4, 0x0205)
    relocatable = bool(field(OFF_RELOCATABLE, 1, 0x0205))
    if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
        raise LoaderError(f"bzImage kernel_alignment {kernel_alignment:#x} is not a power of two")
    payload_offset = field(OFF_PAYLOAD_OFFSET, 4, MIN_VERSION_PAYLOAD)
    payload_length = field(OFF_PAYLOAD_LENGTH, 4, MIN_VERSION_PAYLOAD)
    if payload_offset + payload_length > kernel_size:
        raise LoaderError(f"bzImage payload ({payload_length:#x} bytes at offset {payload_offset:#x}) extends "
                          f"past the protected-mode kernel ({kernel_size:#x} bytes)")
    code32_start = field(OFF_CODE32_START, 4, 0x0200, layout.HIGH_MEMORY_START)
    pref_address = field(OFF_PREF_ADDRESS, 8, 0x020A, code32_start)
    init_size = field(OFF_INIT_SIZE, 4, 0x020A, kernel_size)
    if init_size < kernel_size:
        raise LoaderError(f"bzImage init_size {init_size:#x} is smaller than its protected-mode kernel "
                          f"({kernel_size:#x} bytes)")

    kernel_version = ""
    pointer = field(OFF_KERNEL_VERSION, 2, 0x0200)
    if pointer:
        start = pointer + 0x200
        end = min(start + 256, setup_size)
        raw = bytes(data[start:end]).split(b"\0", 1)[0] if start < end else b""
        kernel_version = raw.decode("ascii", "replace")

    return SetupHeader(
        version=version,
        setup_sects=setup_sects,
        header_end=header_end,
        syssize=syssize,
        loadflags=loadflags,
        xloadflags=field(OFF_XLOADFLAGS, 2, MIN_VERSION_64BIT),
        code32_start=code32_start,
        initrd_addr_max=field(OFF_INITRD_ADDR_MAX, 4, 0x0203, DEFAULT_INITRD_ADDR_MAX),
        kernel_alignment=kernel_alignment,
        relocatable=relocatable,
        min_alignment=field(OFF_MIN_ALIGNMENT, 1, 0x020A),
        cmdline_size=field(OFF_CMDLINE_SIZE, 4, 0x0206, 255),
        payload_offset=payload_offset,
        payload_length=payload_length,
        pref_address=pref_address,
        init_size=init_size,
        kernel_version=kernel_version,
    )


def payload_of(data: bytes, header: SetupHeader | None = None) -> memoryview:
    """The compressed vmlinux inside a bzImage (protocol 2.08+)."""
    header = header or parse_setup_header(data)
    if header.version < MIN_VERSION_PAYLOAD:
        raise LoaderError(f"bzImage boot protocol {header.version_text} is too old: finding the compressed "
                          f"kernel needs 2.08+ (payload_offset)")
    if header.payload_length < 8:
        raise LoaderError(f"bzImage payload_length {header.payload_length} is too small for a compressed kernel")
    start = header.setup_size + header.payload_offset
    return memoryview(data)[start:start + header.payload_length]


# --- what every Linux boot path shares --------------------------------------------------------

def encode_cmdline(cmdline: str, limit: int) -> bytes:
    """The command line as the kernel reads it: bytes and a NUL, at most `limit` bytes before it."""
    raw = cmdline.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise LoaderError("kernel command line contains a NUL byte")
    limit = min(limit, layout.CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise LoaderError(f"kernel command line is {len(raw)} bytes, this kernel accepts at most {limit}")
    return raw + b"\0"


def place_initrd(memory: GuestMemory, size: int, *, limit: int, avoid: Sequence[tuple[int, int]],
                 what: str = "initrd") -> int:
    """The highest page-aligned address where `size` bytes fit in RAM below `limit`.

    `avoid` are [start, end) ranges the initrd must not touch (the kernel's memory); RAM
    below 1 MiB is never used.
    """
    if size <= 0:
        raise LoaderError(f"{what} is empty")
    avoid = sorted(avoid)
    for region in sorted(memory.regions, key=lambda r: r.guest_base, reverse=True):
        low = max(region.guest_base, layout.HIGH_MEMORY_START)
        high = min(region.guest_end, limit)
        while high - low >= size:
            address = (high - size) & ~(PAGE - 1)
            if address < low:
                break
            clash = [(s, e) for s, e in avoid if s < address + size and address < e]
            if not clash:
                return address
            high = min(s for s, _ in clash)  # try again just below the lowest range in the way
    kernel = ", ".join(f"{s:#x}-{e - 1:#x}" for s, e in avoid) or "none"
    raise LoaderError(f"{what} ({format_size(size)}) does not fit in guest RAM below {limit:#x} outside the "
                      f"kernel ({kernel}); guest RAM is {format_size(memory.size)}")


def e820_entries(memory: GuestMemory) -> list[layout.E820Entry]:
    entries = layout.e820_map(memory.size)
    if len(entries) > E820_MAX_ENTRIES:
        raise LoaderError(f"memory map has {len(entries)} entries, boot_params holds {E820_MAX_ENTRIES}")
    return entries


# --- the 64-bit boot protocol -----------------------------------------------------------------

def require_64bit_entry(header: SetupHeader) -> None:
    if header.version < MIN_VERSION_64BIT:
        raise LoaderError(f"bzImage boot protocol {header.version_text} is too old: the 64-bit entry needs 2.12+")
    if not header.xloadflags & XLF_KERNEL_64:
        raise LoaderError("bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear in xloadflags)")


def choose_load_address(memory: GuestMemory, header: SetupHeader) -> int:
    """pref_address when the kernel fits there, else KERNEL_LOAD_64 (relocatable kernels only)."""
    size = header.init_size
    candidates = [header.pref_address]
    if header.relocatable:
        align = max(header.kernel_alignment, 1)
        if header.pref_address % align:
            candidates = []
        candidates.append((layout.KERNEL_LOAD_64 + align - 1) & ~(align - 1))
    first_error = None
    for address in candidates:
        if address + size > FOUR_GIB:
            first_error = first_error or LoaderError(
                f"bzImage kernel at {address:#x} (init_size {size:#x}) would run past 4 GiB")
            continue
        try:
            check_range(memory, address, size, "bzImage kernel (init_size)")
        except LoaderError as exc:
            first_error = first_error or exc
            continue
        return address
    assert first_error is not None
    raise first_error


def build_boot_params(data: bytes, header: SetupHeader, memory: GuestMemory, *, cmd_line_ptr: int,
                      initrd: tuple[int, int] | None, rsdp: int | None, load_address: int) -> bytes:
    """struct boot_params: zeros, the image's setup header, and what the boot loader fills in."""
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER_START:header.header_end] = data[SETUP_HEADER_START:header.header_end]
    bp[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    bp[OFF_LOADFLAGS] = (header.loadflags | LOADED_HIGH | CAN_USE_HEAP) & ~KEEP_SEGMENTS
    struct.pack_into("<I", bp, OFF_CODE32_START, load_address)
    struct.pack_into("<H", bp, OFF_HEAP_END_PTR, HEAP_END_PTR)
    bp[OFF_EXT_LOADER_VER] = bp[OFF_EXT_LOADER_TYPE] = 0
    struct.pack_into("<I", bp, OFF_CMD_LINE_PTR, cmd_line_ptr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmd_line_ptr >> 32)
    if header.header_end >= OFF_SETUP_DATA + 8:
        struct.pack_into("<Q", bp, OFF_SETUP_DATA, 0)
    address, size = initrd or (0, 0)
    struct.pack_into("<II", bp, OFF_RAMDISK_IMAGE, address & 0xFFFFFFFF, size & 0xFFFFFFFF)
    struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, address >> 32, size >> 32)
    if rsdp and header.version >= MIN_VERSION_RSDP:
        struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp)
    entries = e820_entries(memory)
    bp[BP_E820_ENTRIES] = len(entries)
    for index, e in enumerate(entries):
        E820_ENTRY.pack_into(bp, BP_E820_TABLE + index * E820_ENTRY.size, e.address, e.size, e.kind)
    return bytes(bp)


def load_bzimage(memory: GuestMemory, data: bytes, *, cmdline: str = "", initrd: bytes | None = None,
                 rsdp: int | None = layout.ACPI_RSDP) -> BootEntry:
    """Load a bzImage for its 64-bit entry: kernel, initrd, command line and boot_params.

    `rsdp` is the guest-physical address of the ACPI RSDP (None: the guest has no ACPI tables).
    """
    header = parse_setup_header(data)
    require_64bit_entry(header)
    raw_cmdline = encode_cmdline(cmdline, header.cmdline_size)
    load_address = choose_load_address(memory, header)
    kernel_bytes = memoryview(data)[header.setup_size:header.setup_size + header.kernel_size]
    kernel = Placement(load_address, kernel_bytes, header.init_size, "bzImage kernel")
    entry = load_address + ENTRY_64_OFFSET
    check_entry(entry, [kernel], "bzImage 64-bit entry point")

    placements = [kernel]
    ramdisk = None
    if initrd is not None:
        limit = min(header.initrd_addr_max + 1, FOUR_GIB)
        address = place_initrd(memory, len(initrd), limit=limit,
                               avoid=[(load_address, load_address + header.init_size)])
        placements.append(Placement(address, initrd, len(initrd), "initrd"))
        ramdisk = (address, len(initrd))
    boot_params = build_boot_params(data, header, memory, cmd_line_ptr=layout.CMDLINE, initrd=ramdisk,
                                    rsdp=rsdp, load_address=load_address)

    loaded = write_placements(memory, placements)
    try:
        memory.write(layout.ZERO_PAGE, boot_params)
        memory.write(layout.CMDLINE, raw_cmdline)
    except GuestMemoryError as exc:
        raise LoaderError(f"cannot write boot_params: {exc}") from None
    name = f"Linux {header.release} bzImage" if header.release else "Linux bzImage"
    kind = f"{name} (64-bit boot protocol {header.version_text})"
    logger.info("%s: kernel at %#x (init_size %#x), entry %#x, initrd %s, boot_params at %#x",
                kind, load_address, header.init_size, entry,
                f"{ramdisk[0]:#x}+{ramdisk[1]:#x}" if ramdisk else "none", layout.ZERO_PAGE)
    return BootEntry(mode=CpuMode.LONG_64, entry=entry, registers={"rsi": layout.ZERO_PAGE},
                     kind=kind, loaded=loaded, cmdline=cmdline)
