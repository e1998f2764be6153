"""Flat binaries: copied verbatim to one address which is also the entry point."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64.layout import MiB, ram_regions
from pyvmm.loader import CpuMode, LoaderError, load_flat, load_image, load_kernel
from pyvmm.memory.guest_memory import GuestMemory

try:
    from . import imagegen as ig
except ImportError:  # tests/unit is not a package: pytest put its directory on sys.path
    import imagegen as ig

RAM = 4 * MiB


@pytest.fixture
def memory():
    with GuestMemory.from_specs(ram_regions(RAM)) as mem:
        mem.fill(0, RAM, 0xAA)
        yield mem


def test_flat_binary_default_protected_mode(memory):
    blob = ig.pattern(1000)
    boot = load_flat(memory, blob, 0x100000)
    assert boot.mode is CpuMode.PROTECTED_32
    assert boot.entry == 0x100000
    assert boot.kind == "flat binary"
    assert boot.registers == {}
    assert boot.loaded == [(0x100000, 1000)]
    assert memory.read(0x100000, 1000) == blob
    assert memory.read_u8(0x100000 + 1000) == 0xAA


def test_flat_binary_long_mode_in_low_area(memory):
    boot = load_flat(memory, b"\xf4", 0x30000, CpuMode.LONG_64)
    assert boot.mode is CpuMode.LONG_64 and boot.entry == 0x30000
    assert memory.read_u8(0x30000) == 0xF4


def test_load_kernel_flat_address_wins_over_elf_detection(memory, tmp_path):
    # flat_address means "this is raw bytes" even when they look like an ELF/Multiboot image
    image = ig.multiboot_elf(ig.pattern(16))
    path = tmp_path / "guest.bin"
    path.write_bytes(image)
    boot = load_kernel(memory, path, flat_address=0x200000, flat_mode=CpuMode.LONG_64)
    assert boot.kind == "flat binary" and boot.mode is CpuMode.LONG_64
    assert memory.read(0x200000, len(image)) == image
    assert memory.read_u8(0x100000) == 0xAA


def test_flat_keeps_cmdline_in_result(memory):
    assert load_image(memory, b"\x90", flat_address=0x100000, cmdline="a=b").cmdline == "a=b"


@pytest.mark.parametrize("address, size, message", [
    (0x0, 16, "boot structures"),
    (0x7000, 16, "boot structures"),
    (0x2FFFF, 2, "boot structures"),
    (0x9FBFF, 2, "reserved"),
    (0xF0000, 16, "reserved"),
    (0x3FFFF0, 32, "image larger than guest RAM"),
    (0x400000, 1, "image larger than guest RAM"),
    (0xFEE00000, 4, "outside guest RAM"),
])
def test_flat_binary_placement_errors(memory, address, size, message):
    with pytest.raises(LoaderError, match=message):
        load_flat(memory, b"x" * size, address)


def test_flat_errors(memory, tmp_path):
    with pytest.raises(LoaderError, match="empty"):
        load_flat(memory, b"", 0x100000)
    with pytest.raises(LoaderError, match="CpuMode"):
        load_flat(memory, b"x", 0x100000, "long")
    with pytest.raises(LoaderError, match="Multiboot"):
        load_image(memory, b"x", flat_address=0x100000, modules=["/x"])
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(LoaderError, match=r"empty\.bin: flat binary is empty"):
        load_kernel(memory, empty, flat_address=0x100000)


def test_flat_too_big_says_sizes(memory):
    with pytest.raises(LoaderError) as err:
        load_flat(memory, bytes(5 * MiB), 0x100000)
    text = str(err.value)
    assert "image larger than guest RAM" in text and "5 MiB" in text and "4 MiB" in text


@settings(max_examples=200, deadline=None)
@given(address=st.integers(0, (1 << 64) + 10), size=st.integers(1, 64))
def test_any_address_loads_or_raises_loader_error(address, size):
    with GuestMemory.from_specs(ram_regions(2 * MiB)) as mem:
        try:
            boot = load_flat(mem, b"z" * size, address)
        except LoaderError:
            return
        assert mem.read(address, size) == b"z" * size
        assert boot.entry == address
        assert 0x30000 <= address and (address >= MiB or address + size <= 0x9FC00)
