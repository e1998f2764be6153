"""Multiboot 1 loading: ELF and a.out-kludge kernels, modules, command line, information structure."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64.layout import CMDLINE, CMDLINE_MAX, GiB, MiB, MULTIBOOT_INFO, e820_map, ram_regions
from pyvmm.loader import CpuMode, LoaderError, load_image, load_kernel, load_multiboot
from pyvmm.loader.multiboot import memory_info
from pyvmm.memory.guest_memory import GuestMemory

try:
    from . import imagegen as ig
except ImportError:  # tests/unit is not a package: pytest put its directory on sys.path
    import imagegen as ig

RAM = 4 * MiB
MB_BOOTLOADER_MAGIC = 0x2BADB002


@pytest.fixture
def memory():
    with GuestMemory.from_specs(ram_regions(RAM)) as mem:
        mem.fill(0, RAM, 0xAA)
        yield mem


@pytest.fixture(scope="module")
def shared_memory():
    with GuestMemory.from_specs(ram_regions(RAM)) as mem:
        yield mem


def read_info(memory, address):
    """Decode the multiboot_info fields pyvmm provides, following its pointers."""
    flags, mem_lower, mem_upper, _boot_device, cmdline, mods_count, mods_addr = \
        struct.unpack("<7I", memory.read(address, 28))
    mmap_length, mmap_addr = struct.unpack("<II", memory.read(address + 44, 8))
    boot_loader_name = memory.read_u32(address + 64)
    mmap, cursor = [], mmap_addr
    while cursor < mmap_addr + mmap_length:
        size = memory.read_u32(cursor)
        base, length, kind = struct.unpack("<QQI", memory.read(cursor + 4, 20))
        mmap.append((base, length, kind))
        cursor += size + 4
    mods = []
    for i in range(mods_count):
        start, end, string, _ = struct.unpack("<IIII", memory.read(mods_addr + 16 * i, 16))
        mods.append((start, end, memory.read_cstring(string).decode()))
    return {
        "flags": flags, "mem_lower": mem_lower, "mem_upper": mem_upper,
        "cmdline_addr": cmdline, "cmdline": memory.read_cstring(cmdline, CMDLINE_MAX).decode(),
        "mods": mods, "mods_addr": mods_addr, "mmap": mmap, "mmap_addr": mmap_addr,
        "mmap_length": mmap_length, "name": memory.read_cstring(boot_loader_name).decode(),
        "name_addr": boot_loader_name,
    }


# --- Multiboot ELF ------------------------------------------------------------------------

def test_accelerator_linux_arguments_are_not_a_multiboot_kernels(memory):
    image = ig.multiboot_elf(ig.pattern(0x10))
    boot = load_image(memory, image, cmdline="quiet", linux_cmdline="tsc=nowatchdog")
    assert boot.cmdline == "quiet" and read_info(memory, MULTIBOOT_INFO)["cmdline"] == "quiet"


def test_multiboot_elf32_kernel_and_info(memory):
    code = ig.pattern(0x100)
    image = ig.multiboot_elf(code, bss=0x3000)
    boot = load_image(memory, image, cmdline="console=ttyS0 quiet")
    assert boot.mode is CpuMode.PROTECTED_32
    assert boot.kind == "Multiboot ELF32 kernel"
    assert boot.entry == 0x100000 + 12  # code right after the 12-byte header
    assert boot.registers == {"rax": MB_BOOTLOADER_MAGIC, "rbx": MULTIBOOT_INFO}
    assert boot.cmdline == "console=ttyS0 quiet"
    assert boot.loaded == [(0x100000, 12 + 0x100 + 0x3000)]
    assert memory.read(0x10000C, 0x100) == code
    assert memory.read(0x10010C, 0x3000) == bytes(0x3000)

    info = read_info(memory, MULTIBOOT_INFO)
    for bit in (0, 2, 3, 6, 9):  # MEM, CMDLINE, MODS, MMAP, BOOT_LOADER_NAME
        assert info["flags"] & (1 << bit)
    assert info["flags"] & (1 << 1) == 0  # no boot device: there is no BIOS disk
    assert info["mem_lower"] == 0x9FC00 // 1024 == 639
    assert info["mem_upper"] == (RAM - MiB) // 1024
    assert info["cmdline_addr"] == CMDLINE
    assert info["cmdline"] == "console=ttyS0 quiet"
    assert info["name"] == "pyvmm"
    assert info["mods"] == []
    assert info["mmap"] == [(e.address, e.size, e.kind) for e in e820_map(RAM)]
    assert info["mmap"][0] == (0, 0x9FC00, 1) and info["mmap"][-2] == (MiB, RAM - MiB, 1)
    # every piece of the structure sits in pyvmm's area below the command line
    for key in ("mmap_addr", "mods_addr", "name_addr"):
        assert MULTIBOOT_INFO <= info[key] < CMDLINE


def test_multiboot_elf_higher_half_with_physical_entry(memory):
    # the classic higher-half kernel: vaddr 0xC0100000, paddr 1 MiB, e_entry physical
    header = ig.multiboot_header()
    seg = ig.Seg(0x100000, header + ig.pattern(64), vaddr=0xC0100000)
    image = ig.elf32([seg], entry=0x10000C)
    assert load_image(memory, image).entry == 0x10000C


def test_multiboot_elf64_kernel_enters_in_32_bit_mode(memory):
    image = ig.multiboot_elf(ig.pattern(32), bits=64)
    boot = load_image(memory, image)
    assert boot.kind == "Multiboot ELF64 kernel"
    assert boot.mode is CpuMode.PROTECTED_32
    assert boot.registers["rax"] == MB_BOOTLOADER_MAGIC


def test_header_found_anywhere_aligned_in_the_first_8_kib(memory):
    # ehdr+phdr take 0x54 bytes, data is 16-aligned at 0x60; put the header at ~8 KiB - 12
    image = ig.multiboot_elf(ig.pattern(16), header_offset=8192 - 12 - 0x60)
    assert load_image(memory, image).kind == "Multiboot ELF32 kernel"


def test_header_past_8_kib_or_misaligned_is_not_multiboot(memory):
    late = ig.multiboot_elf(ig.pattern(16), header_offset=8192 - 0x60)
    assert load_image(memory, late).kind == "ELF32 kernel"
    misaligned = ig.multiboot_elf(ig.pattern(16), header_offset=2)
    assert load_image(memory, misaligned).kind == "ELF32 kernel"


def test_modules_are_loaded_page_aligned_above_the_kernel(memory, tmp_path):
    first, second = tmp_path / "initrd.img", tmp_path / "empty.mod"
    first.write_bytes(ig.pattern(5000, 7))
    second.write_bytes(b"")
    third = tmp_path / "third.mod"
    third.write_bytes(b"\x33" * 10)
    kernel = tmp_path / "kernel.elf"
    # kernel occupies 0x100000 .. 0x10510b (bss included): modules start at 0x106000
    kernel.write_bytes(ig.multiboot_elf(ig.pattern(0x100), bss=0x5000))
    boot = load_kernel(memory, kernel, cmdline="root=/dev/ram0",
                       modules=[f"{first} rw  size=5000", str(second), third])
    info = read_info(memory, MULTIBOOT_INFO)
    assert info["mods"] == [
        (0x106000, 0x106000 + 5000, f"{first} rw  size=5000"),
        (0x108000, 0x108000, str(second)),
        (0x108000, 0x10800A, str(third)),
    ]
    assert memory.read(0x106000, 5000) == ig.pattern(5000, 7)
    assert memory.read(0x108000, 10) == b"\x33" * 10
    assert (0x106000, 5000) in boot.loaded and (0x108000, 10) in boot.loaded
    assert info["cmdline"] == "root=/dev/ram0"


def test_module_above_low_kernel_still_goes_above_1_mib(memory, tmp_path):
    mod = tmp_path / "m"
    mod.write_bytes(b"m" * 100)
    image = ig.multiboot_elf(ig.pattern(32), paddr=0x40000)
    load_image(memory, image, modules=[str(mod)])
    assert read_info(memory, MULTIBOOT_INFO)["mods"][0][0] == MiB


def test_memory_info_for_large_guests():
    # with 5 GiB, low RAM stops at the 3 GiB PCI hole: mem_upper counts only up to it
    lower, upper = memory_info(e820_map(5 * GiB))
    assert lower == 639
    assert upper == (3 * GiB - MiB) // 1024
    assert memory_info(e820_map(2 * MiB)) == (639, 1024)


# --- a.out kludge -------------------------------------------------------------------------

def test_aout_kludge_image_with_bss(memory):
    payload = ig.pattern(0x300, 5)
    image = ig.aout_image(0x200000, payload, header_offset=0x40, bss=0x1800)
    boot = load_image(memory, image, cmdline="x")
    assert boot.kind == "Multiboot a.out-kludge kernel"
    assert boot.mode is CpuMode.PROTECTED_32
    assert boot.entry == 0x200000 + 0x40 + 32
    assert memory.read(0x200000, len(image)) == image  # the whole file from load_addr
    assert memory.read(0x200000 + len(image), 0x1800) == bytes(0x1800)
    assert memory.read_u8(0x200000 + len(image) + 0x1800) == 0xAA
    assert boot.loaded == [(0x200000, len(image) + 0x1800)]
    assert boot.registers == {"rax": MB_BOOTLOADER_MAGIC, "rbx": MULTIBOOT_INFO}
    assert read_info(memory, MULTIBOOT_INFO)["cmdline"] == "x"


def test_aout_load_addr_after_file_start_and_partial_load(memory):
    # load_addr = header_addr: the filler before the header stays in the file only;
    # load_end_addr stops before the file's end
    payload = ig.pattern(0x100)
    image = ig.aout_image(0x100000, payload, header_offset=0x20, header_addr=0x100000,
                          load_end=0x100000 + 32 + 0x80, entry=0x100000 + 32)
    boot = load_image(memory, image)
    assert boot.loaded == [(0x100000, 32 + 0x80)]
    assert memory.read(0x100000 + 32, 0x80) == payload[:0x80]
    assert memory.read_u8(0x100000 + 32 + 0x80) == 0xAA


def test_aout_load_end_zero_means_whole_file(memory):
    image = ig.aout_image(0x100000, ig.pattern(100), load_end=0, bss_end=0)
    assert load_image(memory, image).loaded == [(0x100000, len(image))]


def test_aout_kludge_wins_over_elf_headers(memory):
    # an ELF whose Multiboot header sets bit 16: the address fields decide
    elf_part = ig.elf32([ig.Seg(0x300000, b"e" * 16)], entry=0x300000)
    header_offset = len(elf_part) + (-len(elf_part)) % 4
    image = bytearray(elf_part + bytes(header_offset - len(elf_part)))
    image += ig.multiboot_header(ig.MB_AOUT_KLUDGE, aout=(0x100000 + header_offset, 0x100000, 0, 0,
                                                        0x100000 + header_offset + 32))
    image += b"\x90" * 16
    boot = load_image(memory, bytes(image))
    assert boot.kind == "Multiboot a.out-kludge kernel"
    assert memory.read(0x100000, len(image)) == bytes(image)
    assert memory.read_u8(0x300000) == 0xAA


# --- flags --------------------------------------------------------------------------------

def test_video_mode_request_is_ignored_with_a_warning(memory, caplog):
    image = ig.multiboot_elf(ig.pattern(32), flags=ig.MB_PAGE_ALIGN | ig.MB_VIDEO_MODE)
    with caplog.at_level(logging.WARNING, logger="pyvmm.loader.multiboot"):
        load_image(memory, image)
    assert any("video" in r.getMessage() for r in caplog.records)


def test_optional_high_flag_bits_are_ignored(memory):
    image = ig.multiboot_elf(ig.pattern(32), flags=ig.MB_PAGE_ALIGN | (1 << 20))
    assert load_image(memory, image).kind == "Multiboot ELF32 kernel"


@pytest.mark.parametrize("bit", [3, 5, 15])
def test_unknown_required_flag_bits_are_refused(memory, bit):
    image = ig.multiboot_elf(ig.pattern(32), flags=1 << bit)
    with pytest.raises(LoaderError, match="does not support"):
        load_image(memory, image)


# --- malformed ----------------------------------------------------------------------------

GOOD_AOUT = ig.aout_image(0x100000, ig.pattern(0x80), header_offset=0x10, bss=0x100)
GOOD_MB_ELF = ig.multiboot_elf(ig.pattern(0x60), bss=0x200)


def test_bad_checksum_is_refused(memory):
    for image in (ig.multiboot_elf(ig.pattern(32), checksum=0x12345678),
                  ig.aout_image(0x100000, b"x" * 16)[:8] + b"\0\0\0\0" + ig.aout_image(0x100000, b"x" * 16)[12:]):
        with pytest.raises(LoaderError, match="checksum"):
            load_image(memory, image)


AOUT_BAD = {
    "load_addr above header_addr": dict(header_addr=0x0FFFF0),
    "header before file start": dict(header_addr=0x100400),
    "load_end at header": dict(load_end=0x100000),
    "load_end past eof": dict(load_end=0x100000 + 0x1000),
    "bss_end below load_end": dict(bss_end=0x100010),
    "entry outside": dict(entry=0x300000),
    "entry in the pci hole": dict(entry=0xFEE00000),
    "on boot structures": dict(load_addr=0x800),
    "into the ebda": dict(load_addr=0x9FBC0),
    "bss past ram": dict(bss_end=0x100000 + 8 * MiB),
    "past ram": dict(load_addr=0x800000),
    "past 4 GiB": dict(load_addr=0xFFFFFFF0, entry=0xFFFFFFF0),
}


@pytest.mark.parametrize("name", sorted(AOUT_BAD))
def test_bad_aout_fields_are_refused(memory, name):
    kw = dict(AOUT_BAD[name])
    load_addr = kw.pop("load_addr", 0x100000)
    image = ig.aout_image(load_addr, ig.pattern(0x80), **kw)
    with pytest.raises(LoaderError) as err:
        load_image(memory, image)
    assert "\n" not in str(err.value)
    assert memory.read(0x100000, 0x100) == b"\xaa" * 0x100


def test_aout_fields_cut_off_by_end_of_file(memory):
    image = ig.multiboot_header(ig.MB_AOUT_KLUDGE) + b"\0" * 8  # needs 20 more bytes, has 8
    with pytest.raises(LoaderError, match="cut off"):
        load_image(memory, image)


def test_non_elf_without_aout_kludge_is_refused(memory):
    image = ig.multiboot_header(ig.MB_PAGE_ALIGN) + ig.pattern(100)
    with pytest.raises(LoaderError, match="ELF"):
        load_image(memory, image)


def test_multiboot_elf_with_broken_elf_is_refused(memory):
    image = bytearray(GOOD_MB_ELF)
    image[18] = 40  # e_machine: ARM
    with pytest.raises(LoaderError, match="ARM"):
        load_image(memory, bytes(image))


def test_cmdline_limits(memory):
    image = ig.multiboot_elf(ig.pattern(32))
    longest = "x" * (CMDLINE_MAX - 1)
    load_image(memory, image, cmdline=longest)
    assert len(memory.read_cstring(CMDLINE, CMDLINE_MAX + 1)) == CMDLINE_MAX - 1
    with pytest.raises(LoaderError, match="command line is"):
        load_image(memory, image, cmdline=longest + "y")
    with pytest.raises(LoaderError, match="NUL"):
        load_image(memory, image, cmdline="a\0b")


def test_missing_module_is_named(memory, tmp_path):
    with pytest.raises(LoaderError, match="module .*missing.bin.*cannot read"):
        load_image(memory, GOOD_MB_ELF, modules=[f"{tmp_path}/missing.bin arg"])
    with pytest.raises(LoaderError, match="empty module"):
        load_image(memory, GOOD_MB_ELF, modules=["   "])


def test_modules_larger_than_ram_are_refused(memory, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(bytes(3 * MiB))
    with pytest.raises(LoaderError, match="image larger than guest RAM: module"):
        load_image(memory, GOOD_MB_ELF, modules=[str(big)])
    # nothing was written: the kernel is validated and placed together with its modules
    assert memory.read(0x100000, 16) == b"\xaa" * 16


def test_too_many_modules_do_not_fit_the_info_area(memory, tmp_path):
    mod = tmp_path / "m"
    mod.write_bytes(b"1")
    long_args = "a" * 1000
    with pytest.raises(LoaderError, match="does not fit"):
        load_image(memory, GOOD_MB_ELF, modules=[f"{mod} {long_args}"] * 70)
    # ... while a reasonable number does
    load_image(memory, GOOD_MB_ELF, modules=[f"{mod} {long_args}"] * 20)
    assert len(read_info(memory, MULTIBOOT_INFO)["mods"]) == 20


@pytest.mark.parametrize("image", [GOOD_AOUT, GOOD_MB_ELF], ids=["aout", "elf"])
def test_every_truncation_is_refused(shared_memory, image):
    load_image(shared_memory, image)
    for length in range(len(image)):
        with pytest.raises(LoaderError):
            load_image(shared_memory, image[:length])


# --- hypothesis ---------------------------------------------------------------------------

INTERESTING = [0, 1, 0x1000, 0x30000, 0x9FC00, 0xFFFFF, 0x100000, 0x100010, 0x10000C, 0x200000,
               0x7FFFFFFF, 0xFFFFFFFF, 0x1BADB002, 0x00010003, 0xE4514FFB]


@st.composite
def mutations(draw, image: bytes) -> bytes:
    data = bytearray(image)
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            pos = draw(st.integers(0, (min(len(data), 0xC0) - 4) // 4)) * 4  # header words
            value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 0xFFFFFFFF)))
            struct.pack_into("<I", data, pos, value)
        else:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))):]
    return bytes(data)


@pytest.fixture(scope="module")
def module_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mods") / "module.bin"
    path.write_bytes(ig.pattern(3000))
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(mutations(GOOD_AOUT), mutations(GOOD_MB_ELF)), with_module=st.booleans())
def test_mutated_multiboot_only_raises_loader_error(shared_memory, module_file, data, with_module):
    modules = [f"{module_file} a b"] if with_module else []
    try:
        boot = load_image(shared_memory, data, cmdline="hello", modules=modules)
    except LoaderError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(boot.mode, CpuMode)
    assert any(a <= boot.entry < a + s for a, s in boot.loaded)
    for address, size in boot.loaded:
        assert shared_memory.contains(address, size)
        assert address >= 0x1000 and (address >= MiB or address + size <= 0x9FC00)  # page 0 stays pyvmm's
    if boot.registers:
        info_addr = boot.registers["rbx"]
        assert not any(a <= info_addr < a + s for a, s in boot.loaded)  # the information is where the image is not
        info = read_info(shared_memory, info_addr)
        assert info["cmdline"] == "hello"
        assert len(info["mods"]) == len(modules)


@settings(max_examples=200, deadline=None)
@given(prefix=st.binary(max_size=64), flags=st.integers(0, 0xFFFFFFFF), rest=st.binary(max_size=64))
def test_random_valid_headers_over_garbage_only_raise_loader_error(shared_memory, prefix, flags, rest):
    prefix = prefix[:len(prefix) & ~3]
    header = struct.pack("<III", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF)
    try:
        load_multiboot(shared_memory, prefix + header + rest)
    except LoaderError:
        pass


def test_kernel_low_in_memory_moves_the_information_out_of_its_way(memory):
    """A test kernel with a real-mode trampoline at 0x8000 covering the default information
    area (0x10000-0x2ffff) loads; the information and command line go where the image is not."""
    image = ig.multiboot_elf(ig.pattern(32), paddr=0x8000, bss=0x30000)  # 0x8000 .. past 0x38000
    boot = load_image(memory, image, cmdline="console=ttyS0")
    info_addr = boot.registers["rbx"]
    kernel_end = 0x8000 + 0x30000 + 32
    assert info_addr >= kernel_end or info_addr + 0x80 <= 0x8000
    info = read_info(memory, info_addr)
    assert info["cmdline"] == "console=ttyS0"
    assert boot.loaded[0][0] == 0x8000
    # the kernel's bytes are intact: the information did not land on them
    assert memory.read(0x8000, 4) == struct.pack("<I", 0x1BADB002)


def test_kernel_in_page_zero_is_refused(memory):
    image = ig.multiboot_elf(ig.pattern(32), paddr=0x500)
    with pytest.raises(LoaderError, match="boot structures at 0x0-0xfff"):
        load_image(memory, image)
