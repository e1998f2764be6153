"""ELF32/ELF64 kernel loading against crafted images, valid and malformed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64.layout import MiB, ram_regions
from pyvmm.loader import BootEntry, CpuMode, LoaderError, load_elf, load_image, load_kernel
from pyvmm.memory.guest_memory import GuestMemory, RegionSpec

try:
    from . import imagegen as ig
except ImportError:  # tests/unit is not a package: pytest put its directory on sys.path
    import imagegen as ig

RAM = 4 * MiB


@pytest.fixture
def memory():
    with GuestMemory.from_specs(ram_regions(RAM)) as mem:
        # poison RAM so that "bss is zeroed" is something the loader has to do
        mem.fill(0, RAM, 0xAA)
        yield mem


@pytest.fixture(scope="module")
def shared_memory():
    with GuestMemory.from_specs(ram_regions(RAM)) as mem:
        yield mem


# --- valid images ------------------------------------------------------------------------

def test_elf32_one_segment_with_bss(memory):
    code = ig.pattern(300)
    image = ig.elf32([ig.Seg(0x100000, code, memsz=300 + 0x2000)], entry=0x100010)
    boot = load_elf(memory, image)
    assert isinstance(boot, BootEntry)
    assert boot.mode is CpuMode.PROTECTED_32
    assert boot.entry == 0x100010
    assert boot.registers == {}
    assert boot.kind == "ELF32 kernel"
    assert boot.loaded == [(0x100000, 300 + 0x2000)]
    assert memory.read(0x100000, 300) == code
    assert memory.read(0x100000 + 300, 0x2000) == bytes(0x2000)
    # nothing written past memsz
    assert memory.read(0x100000 + 300 + 0x2000, 16) == b"\xaa" * 16
    assert memory.read_u8(0xFFFFF) == 0xAA


def test_elf32_two_segments_entry_in_second(memory):
    text, data = ig.pattern(0x180, 1), ig.pattern(0x40, 2)
    image = ig.elf32([ig.Seg(0x100000, text), ig.Seg(0x200000, data, memsz=0x1000)], entry=0x200004)
    boot = load_elf(memory, image)
    assert boot.entry == 0x200004
    assert memory.read(0x100000, len(text)) == text
    assert memory.read(0x200000, len(data)) == data
    assert memory.read(0x200040, 0x1000 - 0x40) == bytes(0x1000 - 0x40)
    assert sorted(boot.loaded) == [(0x100000, 0x180), (0x200000, 0x1000)]


def test_elf64_higher_half_entry_translated_to_physical(memory):
    vbase = 0xFFFFFFFF80000000
    code = ig.pattern(0x200)
    image = ig.elf64([ig.Seg(0x100000, code, vaddr=vbase, memsz=0x800)], entry=vbase + 0x40)
    boot = load_elf(memory, image)
    assert boot.mode is CpuMode.LONG_64
    assert boot.kind == "ELF64 kernel"
    assert boot.entry == 0x100040
    assert memory.read(0x100000, 0x200) == code
    assert memory.read(0x100200, 0x600) == bytes(0x600)


def test_elf64_physical_entry_like_vmlinux(memory):
    vbase = 0xFFFFFFFF81000000
    image = ig.elf64([ig.Seg(0x100000, ig.pattern(64), vaddr=vbase)], entry=0x100020)
    assert load_elf(memory, image).entry == 0x100020


def test_segment_in_low_trampoline_area_is_allowed(memory):
    tramp, kernel = ig.pattern(0x100, 3), ig.pattern(0x100, 4)
    image = ig.elf64([ig.Seg(0x30000, tramp), ig.Seg(0x100000, kernel)], entry=0x100000)
    load_elf(memory, image)
    assert memory.read(0x30000, 0x100) == tramp
    # the last byte before the EBDA is usable too
    image = ig.elf32([ig.Seg(0x9FC00 - 0x10, ig.pattern(0x10))], entry=0x9FC00 - 0x10)
    assert load_elf(memory, image).loaded == [(0x9FBF0, 0x10)]


def test_non_load_segments_and_empty_load_segments_are_ignored(memory):
    image = ig.elf32([ig.Seg(0, b"note", type=ig.PT_NOTE), ig.Seg(0x5000, b"", memsz=0),
                      ig.Seg(0x100000, ig.pattern(32))], entry=0x100000)
    assert load_elf(memory, image).loaded == [(0x100000, 32)]


def test_et_dyn_loads_at_paddr_unchanged(memory):
    image = ig.elf64([ig.Seg(0x180000, ig.pattern(40))], entry=0x180000, etype=ig.ET_DYN)
    boot = load_elf(memory, image)
    assert boot.loaded == [(0x180000, 40)]
    assert memory.read(0x180000, 40) == ig.pattern(40)


def test_load_kernel_reads_file_and_detects_elf(memory, tmp_path):
    path = tmp_path / "kernel.elf"
    path.write_bytes(ig.elf32([ig.Seg(0x100000, ig.pattern(64))], entry=0x100000))
    boot = load_kernel(memory, path, cmdline="ignored here")
    assert boot.kind == "ELF32 kernel"
    assert boot.cmdline == "ignored here"
    assert memory.read(0x100000, 64) == ig.pattern(64)


def test_load_kernel_missing_file_names_it(memory, tmp_path):
    path = tmp_path / "nope.elf"
    with pytest.raises(LoaderError) as err:
        load_kernel(memory, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(LoaderError, match="cannot read"):
        load_kernel(memory, tmp_path)  # a directory


def test_load_kernel_garbage_names_the_file(memory, tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"MZ" + bytes(500))
    with pytest.raises(LoaderError, match=r"junk\.bin: not an ELF or Multiboot kernel"):
        load_kernel(memory, path)


def test_modules_need_multiboot(memory, tmp_path):
    image = ig.elf32([ig.Seg(0x100000, ig.pattern(64))], entry=0x100000)
    with pytest.raises(LoaderError, match="Multiboot"):
        load_image(memory, image, modules=[str(tmp_path / "m")])


# --- malformed images --------------------------------------------------------------------

GOOD32 = ig.elf32([ig.Seg(0x100000, ig.pattern(0x100), memsz=0x400)], entry=0x100000)
GOOD64 = ig.elf64([ig.Seg(0x100000, ig.pattern(0x80)), ig.Seg(0x30000, ig.pattern(0x80, 2), memsz=0x1000)],
                  entry=0x100000)


def _patch(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(image)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


BAD_IMAGES = {
    "class 3": _patch(GOOD32, 4, "B", 3),
    "class 0": _patch(GOOD32, 4, "B", 0),
    "big endian": _patch(GOOD32, 5, "B", 2),
    "data encoding 9": _patch(GOOD32, 5, "B", 9),
    "ident version": _patch(GOOD32, 6, "B", 0),
    "elf32 for x86-64": ig.elf32([ig.Seg(0x100000, b"x")], 0x100000, machine=ig.EM_X86_64),
    "elf64 for i386": ig.elf64([ig.Seg(0x100000, b"x")], 0x100000, machine=ig.EM_386),
    "arm": ig.elf32([ig.Seg(0x100000, b"x")], 0x100000, machine=40),
    "relocatable": ig.elf32([ig.Seg(0x100000, b"x")], 0x100000, etype=ig.ET_REL),
    "core": ig.elf64([ig.Seg(0x100000, b"x")], 0x100000, etype=4),
    "no program headers": ig.elf32([], 0x100000),
    "only a note": ig.elf32([ig.Seg(0x100000, b"x", type=ig.PT_NOTE)], 0x100000),
    "only empty loads": ig.elf32([ig.Seg(0x100000, b"", memsz=0)], 0x100000),
    "phnum 0xffff": ig.elf64([ig.Seg(0x100000, b"x")], 0x100000, phnum=0xFFFF),
    "phentsize small": ig.elf64([ig.Seg(0x100000, b"x")], 0x100000, phentsize=32),
    "phdrs past eof": ig.elf32([ig.Seg(0x100000, b"x")], 0x100000, phoff=0x10000),
    "phnum past eof": ig.elf32([ig.Seg(0x100000, b"x")], 0x100000, phnum=40),
    "filesz > memsz": ig.elf32([ig.Seg(0x100000, b"abcd", memsz=2)], 0x100000),
    "segment past eof": ig.elf32([ig.Seg(0x100000, b"abcd", filesz=0x1000, memsz=0x1000)], 0x100000),
    "offset past eof": ig.elf64([ig.Seg(0x100000, b"abcd", offset=1 << 40)], 0x100000),
    "elf32 wraps 4 GiB": ig.elf32([ig.Seg(0xFFFFF000, b"a", memsz=0x2000)], 0xFFFFF000),
    "at zero": ig.elf32([ig.Seg(0, b"a" * 16)], 0),
    "on the page tables": ig.elf64([ig.Seg(0x9000, b"a" * 16)], 0x9000),
    "on the cmdline": ig.elf32([ig.Seg(0x2FFF0, b"a" * 32)], 0x2FFF0),
    "on the ebda": ig.elf32([ig.Seg(0x9FC00, b"a" * 16)], 0x9FC00),
    "straddles ebda": ig.elf32([ig.Seg(0x9FB00, b"a" * 0x200)], 0x9FB00),
    "low up to 1 MiB": ig.elf32([ig.Seg(0x90000, b"a", memsz=0x80000)], 0x90000),
    "bss beyond ram": ig.elf32([ig.Seg(0x100000, b"a", memsz=8 * MiB)], 0x100000),
    "start beyond ram": ig.elf32([ig.Seg(0x1000000, b"a")], 0x1000000),
    "in the pci hole": ig.elf32([ig.Seg(0xFEC00000, b"a")], 0xFEC00000),
    "above 4 GiB": ig.elf64([ig.Seg(1 << 40, b"a")], 1 << 40),
    "wraps 2^64": ig.elf64([ig.Seg((1 << 64) - 16, b"a", memsz=32)], (1 << 64) - 16),
    "overlapping segments": ig.elf32([ig.Seg(0x100000, b"a" * 64), ig.Seg(0x100020, b"b" * 64)], 0x100000),
    "entry outside segments": ig.elf32([ig.Seg(0x100000, b"a" * 64)], 0x300000),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_malformed_image_raises_loader_error(memory, name):
    before = memory.read(0x100000, 0x1000)
    with pytest.raises(LoaderError) as err:
        load_image(memory, BAD_IMAGES[name])
    message = str(err.value)
    assert message and "\n" not in message
    # a refused image has not touched guest RAM
    assert memory.read(0x100000, 0x1000) == before


def test_error_messages_say_what_is_wrong(memory):
    def error(image):
        with pytest.raises(LoaderError) as err:
            load_image(memory, image)
        return str(err.value)

    assert "big-endian" in error(BAD_IMAGES["big endian"])
    assert "x86-64" in error(BAD_IMAGES["elf64 for i386"]) and "i386" in error(BAD_IMAGES["elf64 for i386"])
    assert "no" in error(BAD_IMAGES["only a note"]) and "PT_LOAD" in error(BAD_IMAGES["only a note"])
    assert "past the end of the file" in error(BAD_IMAGES["segment past eof"])
    assert "exceeds memory size" in error(BAD_IMAGES["filesz > memsz"])
    assert "pyvmm's boot structures" in error(BAD_IMAGES["at zero"])
    assert "reserved" in error(BAD_IMAGES["on the ebda"])
    big = error(BAD_IMAGES["bss beyond ram"])
    assert "image larger than guest RAM" in big and "8 MiB" in big and "4 MiB" in big
    assert "outside guest RAM" in error(BAD_IMAGES["in the pci hole"])
    assert "overlap" in error(BAD_IMAGES["overlapping segments"])


def test_elf64_entry_above_4gib_is_refused_but_data_there_is_fine():
    specs = [RegionSpec(0, 4 * MiB), RegionSpec(4 << 30, 1 * MiB)]
    with GuestMemory.from_specs(specs) as mem:
        high = ig.elf64([ig.Seg(4 << 30, b"h" * 64)], 4 << 30)
        with pytest.raises(LoaderError, match="above 4 GiB"):
            load_image(mem, high)
        both = ig.elf64([ig.Seg(0x100000, b"l" * 64), ig.Seg(4 << 30, b"h" * 64)], 0x100000)
        assert load_image(mem, both).entry == 0x100000
        assert mem.read(4 << 30, 64) == b"h" * 64


def test_refused_second_segment_leaves_first_unwritten(memory):
    image = ig.elf32([ig.Seg(0x100000, b"\x11" * 64), ig.Seg(0x1000, b"\x22" * 64)], 0x100000)
    with pytest.raises(LoaderError):
        load_elf(memory, image)
    assert memory.read(0x100000, 64) == b"\xaa" * 64


@pytest.mark.parametrize("image", [GOOD32, GOOD64], ids=["elf32", "elf64"])
def test_every_truncation_is_refused(shared_memory, image):
    load_image(shared_memory, image)  # the whole image is fine ...
    for length in range(len(image)):  # ... and every prefix of it is not
        with pytest.raises(LoaderError):
            load_image(shared_memory, image[:length])


# --- hypothesis: mutated and random images only ever succeed or raise LoaderError ---------

INTERESTING = [0, 1, 2, 3, 0x20, 0x38, 0x40, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0x100000, 0x30000, 0x9FC00, (1 << 63), (1 << 64) - 1]


@st.composite
def mutations(draw, image: bytes) -> bytes:
    data = bytearray(image)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["byte", "u32", "u64"]))
        # mostly the headers, sometimes anywhere
        hot = min(len(data), 64 + 56 * 3)
        width = {"byte": 1, "u32": 4, "u64": 8}[kind]
        pos = draw(st.one_of(st.integers(0, hot - width), st.integers(0, len(data) - width)))
        if kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        else:
            value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << (8 * width)) - 1)))
            struct.pack_into("<I" if width == 4 else "<Q", data, pos, value & ((1 << (8 * width)) - 1))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))):]
    return bytes(data)


def _check_outcome(memory, data):
    try:
        boot = load_image(memory, data)
    except LoaderError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(boot.mode, CpuMode)
    assert 0 <= boot.entry < 1 << 32
    assert any(a <= boot.entry < a + s for a, s in boot.loaded)
    for address, size in boot.loaded:
        assert memory.contains(address, size)
        assert address >= 0x30000
        assert address >= 0x100000 or address + size <= 0x9FC00


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(mutations(GOOD32), mutations(GOOD64)))
def test_mutated_elf_only_raises_loader_error(shared_memory, data):
    _check_outcome(shared_memory, data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300).map(lambda b: b"\x7fELF" + b))
def test_random_elf_bodies_only_raise_loader_error(shared_memory, data):
    _check_outcome(shared_memory, data)
