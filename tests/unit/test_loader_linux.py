"""Linux loading: bzImage (64-bit boot protocol), PVH vmlinux, payload extraction and its cache."""

from __future__ import annotations

import struct
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64.layout import ACPI_RSDP, CMDLINE, MiB, PVH_START_INFO, ZERO_PAGE, e820_map, ram_regions
from pyvmm.loader import CpuMode, LoaderError, load_image, load_kernel
from pyvmm.loader.linux import (
    NoPvhNoteError,
    extract_vmlinux,
    find_pvh_entry,
    load_bzimage,
    load_pvh,
    parse_setup_header,
    vmlinux_from_bzimage,
)
from pyvmm.loader.linux import decompress as decompress_module
from pyvmm.memory.guest_memory import GuestMemory

try:
    from . import imagegen as ig
    from . import imagegen_linux as lg
except ImportError:  # tests/unit is not a package: pytest put its directory on sys.path
    import imagegen as ig
    import imagegen_linux as lg

RAM = 64 * MiB
PAGE = 4096
HAVE_LZ4 = HAVE_ZSTD = True
try:
    import lz4.block  # noqa: F401
except ImportError:
    HAVE_LZ4 = False
try:
    import zstandard  # noqa: F401
except ImportError:
    HAVE_ZSTD = False

# boot_params offsets (zero-page.rst), kept here independently of the loader
BP_ACPI_RSDP = 0x070
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache: extraction goes to a per-test XDG_CACHE_HOME."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "pyvmm" / "vmlinux"


@pytest.fixture
def memory():
    with GuestMemory.from_specs(ram_regions(RAM)) as mem:
        yield mem


@pytest.fixture(scope="module")
def shared_memory():
    with GuestMemory.from_specs(ram_regions(RAM)) as mem:
        yield mem


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text
    return text


def e820_from_boot_params(bp: bytes) -> list[tuple[int, int, int]]:
    count = bp[BP_E820_ENTRIES]
    return [struct.unpack_from("<QQI", bp, BP_E820_TABLE + 20 * i) for i in range(count)]


def expected_e820(memory_size: int) -> list[tuple[int, int, int]]:
    return [(e.address, e.size, e.kind) for e in e820_map(memory_size)]


VMLINUX = lg.small_vmlinux()
PVH_ENTRY = 0x1000040


# --- setup header ----------------------------------------------------------------------------

def test_setup_header_fields():
    spec = lg.BzImage(lg.compress(VMLINUX, "gzip"), version=0x020F, setup_sects=4, pref_address=0x1000000,
                      init_size=0x800000, initrd_addr_max=0x37FFFFFF, cmdline_size=255)
    data = spec.build()
    h = parse_setup_header(data)
    assert h.version == 0x020F and h.version_text == "2.15"
    assert h.setup_sects == 4 and h.setup_size == 5 * 512
    assert h.kernel_size == len(spec.protected_mode_kernel())
    assert h.payload_offset == 0x300 and h.payload_length == len(spec.payload)
    assert h.pref_address == 0x1000000 and h.init_size == 0x800000
    assert h.kernel_alignment == 0x200000 and h.relocatable
    assert h.initrd_addr_max == 0x37FFFFFF and h.cmdline_size == 255
    assert h.xloadflags & lg.XLF_KERNEL_64
    assert h.release == "6.9.0-pyvmm-test"


def test_setup_sects_zero_means_four():
    data = bytearray(lg.bzimage(VMLINUX, setup_sects=4))
    data[0x1F1] = 0
    assert parse_setup_header(bytes(data)).setup_size == 5 * 512


# --- the 64-bit boot protocol ----------------------------------------------------------------

def test_bzimage_64bit_boot(memory):
    spec = lg.BzImage(lg.compress(VMLINUX, "gzip"), init_size=0x400000)
    data = spec.build()
    initrd = lg.pattern(10000, 3)
    memory.fill(0x1000000, 0x400000, 0xAA)
    boot = load_bzimage(memory, data, cmdline="console=ttyS0 root=/dev/vda", initrd=initrd)
    assert boot.mode is CpuMode.LONG_64
    assert boot.entry == 0x1000000 + 0x200
    assert boot.registers == {"rsi": ZERO_PAGE}
    assert "64-bit boot protocol 2.15" in boot.kind and "6.9.0-pyvmm-test" in boot.kind
    assert boot.cmdline == "console=ttyS0 root=/dev/vda"
    pm = spec.protected_mode_kernel()
    assert memory.read(0x1000000, len(pm)) == pm
    assert memory.read(0x1000000 + len(pm), 0x400000 - len(pm)) == bytes(0x400000 - len(pm))  # init_size zeroed

    bp = memory.read(ZERO_PAGE, 4096)
    assert bp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", bp, 0x206)[0] == 0x020F
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x210] == 0xFF                              # type_of_loader: undefined
    assert bp[0x211] & 0x01 and bp[0x211] & 0x80          # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<H", bp, 0x224)[0] != 0   # heap_end_ptr
    assert struct.unpack_from("<I", bp, 0x228)[0] == CMDLINE
    assert memory.read_cstring(CMDLINE) == b"console=ttyS0 root=/dev/vda"
    assert struct.unpack_from("<Q", bp, BP_ACPI_RSDP)[0] == ACPI_RSDP
    assert e820_from_boot_params(bp) == expected_e820(RAM)
    image, size = struct.unpack_from("<II", bp, 0x218)
    assert size == len(initrd) and memory.read(image, size) == initrd
    assert image % PAGE == 0 and image + size <= RAM
    assert image + size > RAM - 2 * PAGE                  # as high as possible
    assert bp[0xC0:0xC8] == bytes(8)                      # ext_ramdisk_image/size
    assert boot.loaded[0] == (0x1000000, 0x400000)


def test_bzimage_header_copied_into_boot_params(memory):
    data = lg.bzimage(VMLINUX)
    load_bzimage(memory, data)
    bp = memory.read(ZERO_PAGE, 4096)
    # everything the loader does not own is the image's own header
    owned = {0x210, 0x211, 0x214, 0x215, 0x216, 0x217, 0x224, 0x225, 0x226, 0x227,
             0x228, 0x229, 0x22A, 0x22B, 0x218, 0x219, 0x21A, 0x21B, 0x21C, 0x21D, 0x21E, 0x21F}
    owned |= set(range(0x250, 0x258))
    for offset in range(0x1F1, 0x26C):
        if offset not in owned:
            assert bp[offset] == data[offset], hex(offset)
    assert struct.unpack_from("<I", bp, 0x218)[0] == 0 and struct.unpack_from("<I", bp, 0x21C)[0] == 0


def test_bzimage_rsdp_only_from_protocol_2_14(memory):
    load_bzimage(memory, lg.bzimage(VMLINUX, version=0x020D))
    assert memory.read_u64(ZERO_PAGE + BP_ACPI_RSDP) == 0
    load_bzimage(memory, lg.bzimage(VMLINUX, version=0x020E))
    assert memory.read_u64(ZERO_PAGE + BP_ACPI_RSDP) == ACPI_RSDP
    load_bzimage(memory, lg.bzimage(VMLINUX), rsdp=None)
    assert memory.read_u64(ZERO_PAGE + BP_ACPI_RSDP) == 0


def test_bzimage_misaligned_pref_address_loads_at_16_mib(memory):
    boot = load_bzimage(memory, lg.bzimage(VMLINUX, pref_address=0x1234000))
    assert boot.entry == 0x1000200


def test_bzimage_non_relocatable_loads_at_pref_address(memory):
    boot = load_bzimage(memory, lg.bzimage(VMLINUX, relocatable=False, pref_address=0x200000))
    assert boot.entry == 0x200200


def test_bzimage_pref_address_beyond_ram_falls_back_for_relocatable(memory):
    boot = load_bzimage(memory, lg.bzimage(VMLINUX, pref_address=0x8000000))
    assert boot.entry == 0x1000200
    with pytest.raises(LoaderError, match="larger than guest RAM") as err:
        load_bzimage(memory, lg.bzimage(VMLINUX, relocatable=False, pref_address=0x8000000))
    one_line(err.value)


def test_bzimage_kernel_larger_than_ram(memory):
    with pytest.raises(LoaderError, match="larger than guest RAM") as err:
        load_bzimage(memory, lg.bzimage(VMLINUX, init_size=RAM))
    one_line(err.value)


def test_bzimage_cmdline_limit_from_header(memory):
    data = lg.bzimage(VMLINUX, cmdline_size=16)
    load_bzimage(memory, data, cmdline="x" * 16)
    with pytest.raises(LoaderError, match="at most 16") as err:
        load_bzimage(memory, data, cmdline="x" * 17)
    one_line(err.value)
    with pytest.raises(LoaderError, match="NUL"):
        load_bzimage(memory, data, cmdline="a\0b")


def test_bzimage_initrd_respects_initrd_addr_max(memory):
    data = lg.bzimage(VMLINUX, initrd_addr_max=0x2FFFFFF)  # 48 MiB - 1
    boot = load_bzimage(memory, data, initrd=bytes(5000))
    image = memory.read_u32(ZERO_PAGE + 0x218)
    assert image + 5000 <= 0x3000000 and image == 0x3000000 - 2 * PAGE
    assert boot.loaded[-1] == (image, 5000)


def test_bzimage_initrd_never_overlaps_kernel(memory):
    # the kernel's init_size reaches the end of RAM: the initrd has to go below the kernel
    data = lg.bzimage(VMLINUX, init_size=RAM - 0x1000000)
    load_bzimage(memory, data, initrd=bytes(3 * MiB + 5))
    image = memory.read_u32(ZERO_PAGE + 0x218)
    assert image % PAGE == 0
    assert image + 3 * MiB + 5 <= 0x1000000 and image >= 0x100000


def test_bzimage_initrd_too_large(memory):
    with pytest.raises(LoaderError, match="initrd .* does not fit") as err:
        load_bzimage(memory, lg.bzimage(VMLINUX), initrd=bytes(RAM))
    one_line(err.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(init_mib=st.integers(1, 60), initrd_pages=st.integers(1, 16000), extra=st.integers(0, PAGE - 1),
       addr_max_mib=st.integers(2, 80))
def test_bzimage_initrd_placement_invariants(shared_memory, init_mib, initrd_pages, extra, addr_max_mib):
    size = initrd_pages * PAGE - extra
    init_size = init_mib * MiB
    initrd_addr_max = addr_max_mib * MiB - 1
    data = lg.bzimage(VMLINUX, init_size=init_size, initrd_addr_max=initrd_addr_max)
    try:
        load_bzimage(shared_memory, data, initrd=bytes(size))
    except LoaderError as exc:
        one_line(exc)
        return
    image = shared_memory.read_u32(ZERO_PAGE + 0x218)
    assert shared_memory.read_u32(ZERO_PAGE + 0x21C) == size
    assert image % PAGE == 0 and image >= 0x100000
    assert image + size <= min(initrd_addr_max + 1, RAM)
    assert image + size <= 0x1000000 or image >= 0x1000000 + init_size


def test_bzimage_protocol_too_old(memory):
    with pytest.raises(LoaderError, match=r"2\.11 is too old.*2\.12") as err:
        load_bzimage(memory, lg.bzimage(VMLINUX, version=0x020B))
    one_line(err.value)


def test_bzimage_without_64bit_entry(memory):
    with pytest.raises(LoaderError, match="XLF_KERNEL_64"):
        load_bzimage(memory, lg.bzimage(VMLINUX, xloadflags=0))


def test_zimage_refused(memory):
    with pytest.raises(LoaderError, match="zImage"):
        load_bzimage(memory, lg.bzimage(VMLINUX, loadflags=0))


@pytest.mark.parametrize("kw, match", [
    ({"boot_flag": 0x1234}, "boot_flag"),
    ({"syssize": 0x7FFFFFFF}, "truncated bzImage"),
    ({"syssize": 0}, "syssize is 0"),
    ({"payload_length": 1 << 30}, "payload .* extends past"),
    ({"init_size": 0x100}, "init_size .* smaller"),
    ({"kernel_alignment": 0x3000}, "power of two"),
])
def test_bad_setup_headers(memory, kw, match):
    with pytest.raises(LoaderError, match=match) as err:
        load_bzimage(memory, lg.bzimage(VMLINUX, **kw))
    one_line(err.value)


# --- payload decompression and extraction ----------------------------------------------------

FORMATS = ["gzip", "xz", "bzip2", "lzma",
           pytest.param("lz4", marks=pytest.mark.skipif(not HAVE_LZ4, reason="Python package lz4 not installed")),
           pytest.param("zstd", marks=pytest.mark.skipif(not HAVE_ZSTD, reason="zstandard not installed"))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_extract_each_format_trims_relocs(fmt):
    data = lg.bzimage(VMLINUX, fmt, relocs=lg.pattern(3000, 4))
    assert vmlinux_from_bzimage(data) == VMLINUX


def test_lz4_multi_block_payload():
    if not HAVE_LZ4:
        pytest.skip("Python package lz4 not installed")
    big = lg.Vmlinux([lg.Load(0x1000000, lg.pattern(9 * MiB, 3))], entry=0x1000000, pvh_entry=0x1000000).build()
    assert vmlinux_from_bzimage(lg.bzimage(big, "lz4")) == big
    # and the kernel's 8 MiB blocks, read by a loop over several blocks
    payload = lg.lz4_legacy(big, block=1 << 20) + lg.size_trailer(big)
    assert decompress_module.decompress_payload(payload) == big


def test_unknown_compression():
    data = lg.BzImage(b"\x11\x22\x33\x44" + bytes(60)).build()
    with pytest.raises(LoaderError, match="unknown bzImage payload compression") as err:
        vmlinux_from_bzimage(data)
    one_line(err.value)


def test_lzo_is_named():
    data = lg.BzImage(b"\x89LZO\x00" + bytes(60)).build()
    with pytest.raises(LoaderError, match="LZO"):
        vmlinux_from_bzimage(data)


@pytest.mark.parametrize("fmt, module, package", [("lz4", "lz4", "lz4"), ("zstd", "zstandard", "zstandard")])
def test_missing_decompressor_package(monkeypatch, fmt, module, package):
    magic = {"lz4": b"\x02\x21\x4c\x18", "zstd": b"\x28\xb5\x2f\xfd"}[fmt]
    data = lg.BzImage(magic + bytes(60) + struct.pack("<I", 1000)).build()
    monkeypatch.setitem(sys.modules, module, None)
    if module == "lz4":
        monkeypatch.setitem(sys.modules, "lz4.block", None)
    with pytest.raises(LoaderError, match=f"needs the Python package {package}: pip install {package}") as err:
        vmlinux_from_bzimage(data)
    one_line(err.value)


def test_payload_size_trailer_must_match():
    payload = lg.compress(VMLINUX, "xz")
    lying = payload[:-4] + struct.pack("<I", len(VMLINUX) + 1)
    with pytest.raises(LoaderError, match="decompresses to"):
        vmlinux_from_bzimage(lg.BzImage(lying).build())
    lying = payload[:-4] + struct.pack("<I", len(VMLINUX) - 1)
    with pytest.raises(LoaderError, match="more than"):
        vmlinux_from_bzimage(lg.BzImage(lying).build())


def test_payload_that_is_not_an_elf():
    with pytest.raises(LoaderError, match="not an ELF vmlinux"):
        vmlinux_from_bzimage(lg.BzImage(lg.compress(lg.pattern(5000), "gzip")).build())


def test_payload_elf_without_pvh_note():
    data = lg.bzimage(lg.small_vmlinux(pvh=False))
    with pytest.raises(NoPvhNoteError, match="CONFIG_PVH"):
        vmlinux_from_bzimage(data)


def test_payload_protocol_too_old_for_extraction():
    with pytest.raises(LoaderError, match="2.08"):
        vmlinux_from_bzimage(lg.bzimage(VMLINUX, version=0x0207))


def test_extract_caches_by_sha256(tmp_path, private_cache, monkeypatch):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(lg.bzimage(VMLINUX, "xz"))
    path = extract_vmlinux(kernel)
    assert path.parent == private_cache
    assert path.read_bytes() == VMLINUX
    import hashlib
    assert path.name.startswith(hashlib.sha256(kernel.read_bytes()).hexdigest())
    assert [p.name for p in private_cache.iterdir()] == [path.name]  # no temporary files left

    def refuse(*args, **kwargs):
        raise AssertionError("decompressed again")
    with monkeypatch.context() as patch:
        patch.setattr("pyvmm.loader.linux.extract.decompress_payload", refuse)
        assert extract_vmlinux(kernel) == path

    # a damaged cache entry is replaced
    path.write_bytes(b"\x7fELF garbage")
    assert extract_vmlinux(kernel) == path and path.read_bytes() == VMLINUX


def test_extract_cache_dir_argument_and_home_default(tmp_path, monkeypatch):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(lg.bzimage(VMLINUX))
    assert extract_vmlinux(kernel, cache_dir=tmp_path / "c").parent == tmp_path / "c"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert extract_vmlinux(kernel).parent == tmp_path / "home" / ".cache" / "pyvmm" / "vmlinux"


def test_extract_unwritable_cache(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(lg.bzimage(VMLINUX))
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(LoaderError, match="cannot write the extracted vmlinux") as err:
        extract_vmlinux(kernel, cache_dir=blocker / "sub")
    one_line(err.value)


def test_extract_not_a_bzimage(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(VMLINUX)
    with pytest.raises(LoaderError, match="HdrS"):
        extract_vmlinux(kernel)
    with pytest.raises(LoaderError, match="cannot read"):
        extract_vmlinux(tmp_path / "missing")


# --- load_kernel / load_image dispatch ---------------------------------------------------------

def test_bzimage_boots_through_pvh_by_default(memory, tmp_path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(lg.bzimage(VMLINUX, "gzip", relocs=bytes(100)))
    initrd.write_bytes(lg.pattern(7000, 8))
    boot = load_kernel(memory, kernel, cmdline="console=ttyS0", initrd=initrd)
    assert boot.mode is CpuMode.PROTECTED_32
    assert boot.entry == PVH_ENTRY
    assert boot.registers == {"rbx": PVH_START_INFO}
    assert "PVH" in boot.kind and "6.9.0-pyvmm-test" in boot.kind
    assert memory.read(0x1000000, 0x1800) == lg.pattern(0x1800, 1)
    assert memory.read(0x1200000, 0x900) == lg.pattern(0x900, 2)
    assert memory.read(0x1200900, 0x4000 - 0x900) == bytes(0x4000 - 0x900)
    info = memory.read(PVH_START_INFO, 56)
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", info)
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert memory.read_cstring(cmdline) == b"console=ttyS0"
    assert rsdp == ACPI_RSDP
    paddr, size, mod_cmdline, _ = struct.unpack("<QQQQ", memory.read(modlist, 32))
    assert size == 7000 and memory.read(paddr, size) == lg.pattern(7000, 8)
    assert paddr % PAGE == 0 and paddr + size <= RAM
    table = [struct.unpack_from("<QQII", memory.read(memmap, 24 * entries), 24 * i)[:3] for i in range(entries)]
    assert table == expected_e820(RAM)


def test_bzimage_boot_forced(memory, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(lg.bzimage(VMLINUX))
    boot = load_kernel(memory, kernel, boot="bzimage", cmdline="quiet")
    assert boot.mode is CpuMode.LONG_64 and boot.entry == 0x1000200
    assert not (tmp_path / "xdg").exists()  # nothing extracted


def test_kernel_digest_remembered_across_loads(memory, tmp_path, private_cache, monkeypatch):
    # the cached vmlinux is found by the bzImage's sha256, remembered while the file is unchanged
    import hashlib
    import json
    import os

    from pyvmm import file_digests

    monkeypatch.setattr(file_digests, "RACY_SECONDS", -1.0)  # the test's file counts as settled
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(lg.bzimage(VMLINUX, "gzip"))
    load_kernel(memory, kernel)
    real = hashlib.sha256(kernel.read_bytes()).hexdigest()
    assert [p.name for p in private_cache.iterdir()] == [f"{real}.vmlinux"]
    memo_path = private_cache.parent / file_digests.MEMO_FILE
    memo = json.loads(memo_path.read_text())
    memo[os.path.realpath(kernel)][5] = "5" * 64
    memo_path.write_text(json.dumps(memo))
    load_kernel(memory, kernel)  # the memo's answer names the cache entry
    assert sorted(p.name for p in private_cache.iterdir()) == sorted([f"{real}.vmlinux", f"{'5' * 64}.vmlinux"])
    kernel.write_bytes(lg.bzimage(VMLINUX, "xz"))  # another file: hashed again
    load_kernel(memory, kernel)
    assert f"{hashlib.sha256(kernel.read_bytes()).hexdigest()}.vmlinux" in {p.name for p in private_cache.iterdir()}


def test_bzimage_without_pvh_note_falls_back(memory, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(lg.bzimage(lg.small_vmlinux(pvh=False)))
    boot = load_kernel(memory, kernel)
    assert boot.mode is CpuMode.LONG_64 and "64-bit boot protocol" in boot.kind
    with pytest.raises(LoaderError, match="vmlinuz: .*PVH") as err:
        load_kernel(memory, kernel, boot="pvh")
    one_line(err.value)


def test_accelerator_linux_arguments_go_before_the_users_on_every_linux_path(memory, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(lg.bzimage(VMLINUX))
    pvh = load_kernel(memory, kernel, cmdline="quiet", linux_cmdline="tsc=nowatchdog")
    cmdline_paddr = struct.unpack_from("<Q", memory.read(PVH_START_INFO + 24, 8))[0]
    assert pvh.cmdline == "tsc=nowatchdog quiet" and memory.read_cstring(cmdline_paddr) == b"tsc=nowatchdog quiet"
    assert load_kernel(memory, kernel, boot="bzimage", linux_cmdline="tsc=nowatchdog").cmdline == "tsc=nowatchdog"
    assert load_image(memory, VMLINUX, cmdline="a=b", linux_cmdline="tsc=nowatchdog").cmdline == "tsc=nowatchdog a=b"


def test_pvh_elf_is_detected(memory):
    boot = load_image(memory, VMLINUX, cmdline="a=b")
    assert boot.mode is CpuMode.PROTECTED_32 and boot.entry == PVH_ENTRY
    assert boot.kind == "PVH ELF64 kernel" and boot.cmdline == "a=b"
    nr_modules, modlist = struct.unpack_from("<IQ", memory.read(PVH_START_INFO + 12, 12))
    assert (nr_modules, modlist) == (0, 0)


def test_pvh_initrd_is_module_zero_clear_of_the_kernel():
    with GuestMemory.from_specs(ram_regions(0x1204000)) as memory:  # RAM ends right after the kernel's bss
        boot = load_pvh(memory, VMLINUX, initrd=bytes(2 * MiB))
        start = struct.unpack_from("<Q", memory.read(PVH_START_INFO + 16, 8))[0]
        paddr, size = struct.unpack("<QQ", memory.read(start, 16))
        assert size == 2 * MiB and paddr % PAGE == 0
        for address, length in boot.loaded[:-1]:
            assert paddr + size <= address or paddr >= address + length
        assert (paddr, size) == boot.loaded[-1]


def test_pvh_initrd_too_large(memory):
    with pytest.raises(LoaderError, match="initrd .* does not fit") as err:
        load_image(memory, VMLINUX, initrd=bytes(RAM - 2 * MiB))
    one_line(err.value)


def test_pvh_note_only_in_a_section(memory):
    image = lg.Vmlinux([lg.Load(0x1000000, lg.pattern(0x100))], entry=0x1000000, pvh_entry=0x1000010,
                       note_segment=False).build()
    assert find_pvh_entry(image) == 0x1000010
    assert load_image(memory, image).entry == 0x1000010


def test_pvh_note_with_4_byte_descriptor(memory):
    image = lg.Vmlinux([lg.Load(0x1000000, lg.pattern(0x100))], entry=0x1000000, pvh_entry=0x1000020,
                       desc_size=4).build()
    assert load_image(memory, image).entry == 0x1000020


@pytest.mark.parametrize("kw, match", [
    ({"desc_size": 6}, "6-byte descriptor"),
    ({"pvh_entry": 0x3000000}, "PVH entry point 0x3000000 is not inside"),
    ({"pvh_entry": 1 << 32}, "above 4 GiB"),
    ({"extra_notes": struct.pack("<III", 4, 0x1000000, 5) + b"Xen\0"}, "malformed ELF note"),
])
def test_bad_pvh_notes(memory, kw, match):
    args = {"pvh_entry": 0x1000010, **kw}
    image = lg.Vmlinux([lg.Load(0x1000000, lg.pattern(0x100))], entry=0x1000000, **args).build()
    with pytest.raises(LoaderError, match=match) as err:
        load_image(memory, image)
    one_line(err.value)


def test_plain_elf_without_note_stays_plain(memory):
    image = lg.small_vmlinux(pvh=False)
    assert load_image(memory, image).kind == "ELF64 kernel"
    with pytest.raises(LoaderError, match="initrd needs a Linux kernel"):
        load_image(memory, image, initrd=b"x")
    with pytest.raises(LoaderError, match="no PVH entry note"):
        load_image(memory, image, boot="pvh")


def test_multiboot_wins_over_pvh_unless_asked(memory):
    header = ig.multiboot_header()
    text = header + lg.pattern(0x100 - len(header))
    image = lg.Vmlinux([lg.Load(0x100000, text)], entry=0x100000, pvh_entry=0x100080).build()
    # the Multiboot header must be in the first 8 KiB: the text segment is at 0x1000
    assert load_image(memory, image).kind.startswith("Multiboot")
    boot = load_image(memory, image, boot="pvh")
    assert boot.entry == 0x100080 and boot.registers == {"rbx": PVH_START_INFO}


def test_dispatch_errors(memory, tmp_path):
    with pytest.raises(LoaderError, match="unknown boot method"):
        load_image(memory, VMLINUX, boot="efi")
    with pytest.raises(LoaderError, match="needs a Linux bzImage"):
        load_image(memory, VMLINUX, boot="bzimage")
    with pytest.raises(LoaderError, match="initramfs as the initrd"):
        load_image(memory, VMLINUX, modules=["/x"])
    with pytest.raises(LoaderError, match="initrd needs a Linux kernel"):
        load_image(memory, b"\x90", flat_address=0x100000, initrd=b"x")
    kernel = tmp_path / "k"
    kernel.write_bytes(VMLINUX)
    with pytest.raises(LoaderError, match=r"initrd .*missing: cannot read"):
        load_kernel(memory, kernel, initrd=tmp_path / "missing")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(LoaderError, match="is empty"):
        load_kernel(memory, kernel, initrd=tmp_path / "empty")


# --- malformed images (hypothesis) -----------------------------------------------------------

BZ = lg.bzimage(VMLINUX, "gzip", relocs=bytes(64))
BZ_XZ = lg.bzimage(VMLINUX, "xz")
BZ_BZ2 = lg.bzimage(VMLINUX, "bzip2")


@pytest.fixture(scope="module")
def hypo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vmlinux-cache")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=st.sampled_from([BZ, BZ_XZ, BZ_BZ2]), data=st.data(), boot=st.sampled_from(["auto", "bzimage"]))
def test_truncated_bzimage_is_a_loader_error(shared_memory, hypo_cache, image, data, boot):
    length = data.draw(st.integers(0, len(image) - 1))
    with pytest.raises(LoaderError) as err:
        load_image(shared_memory, image[:length], boot=boot, cache_dir=hypo_cache)
    one_line(err.value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=st.sampled_from([BZ, BZ_XZ, BZ_BZ2]), data=st.data(), boot=st.sampled_from(["auto", "bzimage"]))
def test_mutated_bzimage_loads_or_is_a_loader_error(shared_memory, hypo_cache, image, data, boot):
    mutated = bytearray(image)
    for _ in range(data.draw(st.integers(1, 4))):
        # mostly the header and the payload's first and last bytes, where the structure lives
        region = data.draw(st.sampled_from(["header", "payload-head", "payload-tail", "anywhere"]))
        start, end = {"header": (0x1F1, 0x270), "payload-head": (0xA00 + 0x300, 0xA00 + 0x340),
                      "payload-tail": (len(image) - 0x140, len(image) - 0x123), "anywhere": (0, len(image))}[region]
        offset = data.draw(st.integers(start, end - 1))
        mutated[offset] = data.draw(st.integers(0, 255))
    assume(bytes(mutated) != image)
    try:
        load_image(shared_memory, bytes(mutated), boot=boot, cache_dir=hypo_cache)
    except LoaderError as exc:
        one_line(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_vmlinux_is_a_loader_error(shared_memory, data):
    length = data.draw(st.integers(0, len(VMLINUX) - 1))
    try:
        load_image(shared_memory, VMLINUX[:length])
    except LoaderError as exc:
        one_line(exc)
    else:
        # only the trailing section headers may go (the PT_NOTE still holds the entry)
        assert length >= len(VMLINUX) - 5 * 64 - 64


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_vmlinux_loads_or_is_a_loader_error(shared_memory, data):
    mutated = bytearray(VMLINUX)
    for _ in range(data.draw(st.integers(1, 6))):
        offset = data.draw(st.integers(0, 64 + 56 * 3 - 1) | st.integers(len(VMLINUX) - 0x200, len(VMLINUX) - 1))
        mutated[offset] = data.draw(st.integers(0, 255))
    try:
        load_image(shared_memory, bytes(mutated))
    except LoaderError as exc:
        one_line(exc)
