"""Guest memory (src/pyvmm/memory/) and the x86-64 address map (arch/x86_64/layout.py)."""

import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64 import layout
from pyvmm.arch.x86_64.layout import E820Entry, e820_map, ram_regions
from pyvmm.memory import GuestAddress, GuestMemory, GuestMemoryError, MemoryRegion
from pyvmm.memory.guest_memory import RegionSpec

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = mmap.PAGESIZE


# --- GuestAddress ------------------------------------------------------------------------


def test_address_plus_offset_is_an_address():
    a = GuestAddress(0x1000) + 0x20
    assert type(a) is GuestAddress
    assert a == 0x1020


def test_address_minus_distance_is_an_address():
    a = GuestAddress(0x1000) - 0x10
    assert type(a) is GuestAddress
    assert a == 0xFF0


def test_address_minus_address_is_a_plain_distance():
    d = GuestAddress(0x3000) - GuestAddress(0x1000)
    assert type(d) is int
    assert d == 0x2000
    # a distance may be negative; an address may not
    assert GuestAddress(0x1000) - GuestAddress(0x3000) == -0x2000


@pytest.mark.parametrize("value", [-1, 1 << 64, (1 << 64) + 5])
def test_address_outside_64bit_space_rejected(value):
    with pytest.raises(ValueError):
        GuestAddress(value)


def test_address_limits_accepted():
    assert GuestAddress(0) == 0
    assert GuestAddress((1 << 64) - 1) == (1 << 64) - 1


def test_arithmetic_leaving_the_space_raises():
    with pytest.raises(ValueError):
        GuestAddress(0x10) - 0x11
    with pytest.raises(ValueError):
        GuestAddress((1 << 64) - 1) + 1


@pytest.mark.parametrize(
    "value, alignment, up, down",
    [
        (0x1000, 0x1000, 0x1000, 0x1000),
        (0x1001, 0x1000, 0x2000, 0x1000),
        (0x1FFF, 0x1000, 0x2000, 0x1000),
        (0, 0x200000, 0, 0),
        (0x200001, 0x200000, 0x400000, 0x200000),
        (0x13, 8, 0x18, 0x10),
        (7, 1, 7, 7),
    ],
)
def test_alignment(value, alignment, up, down):
    a = GuestAddress(value)
    assert a.align_up(alignment) == up
    assert a.align_down(alignment) == down
    assert type(a.align_up(alignment)) is GuestAddress
    assert type(a.align_down(alignment)) is GuestAddress


@given(st.integers(0, (1 << 48)), st.integers(0, 20))
def test_alignment_properties(value, shift):
    alignment = 1 << shift
    a = GuestAddress(value)
    up, down = a.align_up(alignment), a.align_down(alignment)
    assert up % alignment == 0 and down % alignment == 0
    assert down <= a <= up
    assert up - down in (0, alignment)


def test_align_up_past_the_top_raises():
    with pytest.raises(ValueError):
        GuestAddress((1 << 64) - 1).align_up(0x1000)


def test_address_formatting():
    assert repr(GuestAddress(0x1F)) == "GuestAddress(0x1f)"
    assert str(GuestAddress(0x1F)) == "0x1f"


# --- GuestMemory -------------------------------------------------------------------------


@pytest.fixture
def mem():
    """Two 1 MiB regions with a 1 MiB hole between them: [0, 1M) and [2M, 3M)."""
    m = GuestMemory([MemoryRegion(2 * MiB, MiB), MemoryRegion(0, MiB)])
    yield m
    m.close()


def test_regions_sorted_and_size(mem):
    assert [r.guest_base for r in mem.regions] == [0, 2 * MiB]
    assert mem.size == 2 * MiB
    assert mem.regions[1].guest_end == 3 * MiB


def test_fresh_memory_reads_zero(mem):
    assert mem.read(0, 64) == bytes(64)
    assert mem.read(3 * MiB - 64, 64) == bytes(64)


@pytest.mark.parametrize("address", [0, 0x1234, MiB - 5, 2 * MiB, 3 * MiB - 5])
def test_read_write_round_trip(mem, address):
    data = b"hello"
    mem.write(address, data)
    assert mem.read(address, len(data)) == data
    # nothing else disturbed just before the write
    if mem.contains(address - 1):
        assert mem.read(address - 1, 1) == b"\0"


def test_writes_land_in_the_right_region(mem):
    mem.write(0x100, b"low")
    mem.write(2 * MiB + 0x100, b"high")
    assert mem.regions[0].mmap[0x100:0x103] == b"low"
    assert mem.regions[1].mmap[0x100:0x104] == b"high"


class PwriteSpy:
    """os.pwrite, counted; `fail_after` bytes written, the next call fails (EINVAL, as hugetlbfs)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.fail_after = fail_after
        self._real = os.pwrite

    def __call__(self, fd, data, offset):
        written = sum(n for _, n, _ in self.calls)
        if self.fail_after is not None and written >= self.fail_after:
            raise OSError(22, "Invalid argument")
        limit = len(data) if self.fail_after is None else min(len(data), self.fail_after - written)
        n = self._real(fd, data[:limit], offset)
        self.calls.append((fd, n, offset))
        return n


LOAD = bytes(range(256)) * 1024  # 256 KiB: big enough to go through the file


def test_load_writes_through_the_memfd(mem, monkeypatch):
    spy = PwriteSpy()
    monkeypatch.setattr(os, "pwrite", spy)
    mem.load(2 * MiB + 0x1000, LOAD)
    assert mem.read(2 * MiB + 0x1000, len(LOAD)) == LOAD  # seen through the mapping
    assert mem.read(2 * MiB + 0xFFF, 1) == b"\0" and mem.read(2 * MiB + 0x1000 + len(LOAD), 1) == b"\0"
    assert spy.calls and {fd for fd, _, _ in spy.calls} == {mem.regions[1].fd}
    assert spy.calls[0][2] == 0x1000  # the offset in the region's file


def test_load_of_a_memoryview_slice(mem, monkeypatch):
    monkeypatch.setattr(os, "pwrite", PwriteSpy())
    source = mmap.mmap(-1, len(LOAD) + PAGE)
    source[PAGE:] = LOAD
    mem.load(0, memoryview(source)[PAGE:])
    assert mem.read(0, len(LOAD)) == LOAD


@pytest.mark.parametrize("why", ["small", "anonymous", "lazily filled"])
def test_load_goes_through_the_mapping_where_the_file_would_not_do(why, monkeypatch):
    from pyvmm.memory.backing import Backing

    region = MemoryRegion(0, MiB, backing=Backing(mergeable=True) if why == "anonymous" else Backing())
    memory = GuestMemory([region])
    if why == "lazily filled":
        memory.populator = lambda: None
    data = LOAD[:4096] if why == "small" else LOAD
    spy = PwriteSpy()
    monkeypatch.setattr(os, "pwrite", spy)
    try:
        memory.load(0x2000, data)
        assert memory.read(0x2000, len(data)) == data
        assert spy.calls == []
    finally:
        memory.close()


@pytest.mark.parametrize("fail_after", [0, 100_000])
def test_load_finishes_through_the_mapping_when_the_file_refuses(mem, monkeypatch, fail_after):
    spy = PwriteSpy(fail_after=fail_after)
    monkeypatch.setattr(os, "pwrite", spy)
    mem.load(0x1000, LOAD)
    assert mem.read(0x1000, len(LOAD)) == LOAD
    assert sum(n for _, n, _ in spy.calls) == fail_after


def test_load_outside_ram_raises(mem):
    with pytest.raises(GuestMemoryError):
        mem.load(MiB - 0x1000, LOAD)  # runs into the hole


@given(st.integers(0, MiB - 1), st.binary(min_size=1, max_size=256))
@settings(max_examples=100, deadline=None)
def test_round_trip_property(address, data):
    m = GuestMemory([MemoryRegion(0, MiB)])
    try:
        if address + len(data) <= MiB:
            m.write(address, data)
            assert m.read(address, len(data)) == data
        else:
            with pytest.raises(GuestMemoryError):
                m.write(address, data)
    finally:
        m.close()


def test_integer_accessors_are_little_endian(mem):
    mem.write_u64(0x100, 0x0807060504030201)
    assert mem.read(0x100, 8) == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert mem.read_u8(0x100) == 0x01
    assert mem.read_u16(0x100) == 0x0201
    assert mem.read_u32(0x100) == 0x04030201
    assert mem.read_u64(0x100) == 0x0807060504030201
    assert mem.read_u32(0x104) == 0x08070605

    mem.write_u8(0x200, 0xAB)
    mem.write_u16(0x210, 0xBEEF)
    mem.write_u32(0x220, 0xDEADBEEF)
    mem.write_u64(0x230, 0xFFEEDDCCBBAA9988)
    assert mem.read(0x200, 1) == b"\xab"
    assert mem.read(0x210, 2) == b"\xef\xbe"
    assert mem.read(0x220, 4) == struct.pack("<I", 0xDEADBEEF)
    assert mem.read(0x230, 8) == struct.pack("<Q", 0xFFEEDDCCBBAA9988)
    # neighbours untouched
    assert mem.read(0x201, 1) == b"\0" and mem.read(0x212, 1) == b"\0"


def test_unaligned_integer_reads_are_little_endian_too(mem):
    """(An aligned read is one load from a word view; any other takes the bytes.)"""
    mem.write(0x301, bytes(range(1, 10)))
    assert mem.read_u16(0x301) == 0x0201 and mem.read_u16(0x302) == 0x0302
    assert mem.read_u32(0x303) == 0x06050403
    assert mem.read_u64(0x301) == 0x0807060504030201 and mem.read_u64(0x302) == 0x0908070605040302


@pytest.mark.parametrize(
    "width, value",
    [(8, 0xFF), (16, 0xFFFF), (32, 0xFFFFFFFF), (64, 0xFFFFFFFFFFFFFFFF), (64, 0)],
)
def test_integer_round_trip_at_region_end(mem, width, value):
    address = MiB - width // 8   # the last slot that fits in region 0
    getattr(mem, f"write_u{width}")(address, value)
    assert getattr(mem, f"read_u{width}")(address) == value


@pytest.mark.parametrize("width", [16, 32, 64])
def test_integer_access_straddling_region_end_raises(mem, width):
    address = MiB - width // 8 + 1
    with pytest.raises(GuestMemoryError):
        getattr(mem, f"read_u{width}")(address)
    with pytest.raises(GuestMemoryError):
        getattr(mem, f"write_u{width}")(address, 0)


@pytest.mark.parametrize(
    "address, size",
    [
        (MiB - 4, 8),          # straddles the end of region 0 into the hole
        (MiB, 1),              # first byte of the hole
        (MiB + 0x800, 16),     # inside the hole
        (2 * MiB - 1, 2),      # straddles from the hole into region 1
        (2 * MiB - 1, 1),      # last byte of the hole
        (3 * MiB - 1, 2),      # straddles the end of region 1
        (3 * MiB, 1),          # past all RAM
        (0, 3 * MiB),          # spans the hole
    ],
)
def test_accesses_outside_ram_raise(mem, address, size):
    with pytest.raises(GuestMemoryError):
        mem.read(address, size)
    with pytest.raises(GuestMemoryError):
        mem.write(address, b"\x55" * size)
    with pytest.raises(GuestMemoryError):
        mem.view(address, size)
    assert not mem.contains(address, size)


def test_failed_straddling_write_changes_nothing(mem):
    with pytest.raises(GuestMemoryError):
        mem.write(MiB - 2, b"abcd")
    assert mem.read(MiB - 2, 2) == b"\0\0"


def test_contains(mem):
    assert mem.contains(0, MiB)
    assert mem.contains(2 * MiB, MiB)
    assert not mem.contains(0, MiB + 1)
    assert mem.contains(MiB - 1)
    assert not mem.contains(MiB)


def test_region_for(mem):
    assert mem.region_for(2 * MiB + 5) is mem.regions[1]
    assert mem.region_for(MiB - 1) is mem.regions[0]
    with pytest.raises(GuestMemoryError):
        mem.region_for(MiB)


def test_view_is_zero_copy(mem):
    view = mem.view(2 * MiB + 0x10, 4)
    try:
        view[:] = b"WXYZ"
        assert mem.read(2 * MiB + 0x10, 4) == b"WXYZ"
        mem.write(2 * MiB + 0x11, b"!")
        assert bytes(view) == b"W!YZ"   # writes through memory show in the view
        assert not view.readonly
        assert len(view) == 4
    finally:
        view.release()


def test_view_negative_size_rejected(mem):
    with pytest.raises(GuestMemoryError):
        mem.view(0, -1)


def test_fill(mem):
    mem.fill(0x10, 4, 0x7E)
    assert mem.read(0xF, 6) == b"\0\x7e\x7e\x7e\x7e\0"


def test_read_cstring(mem):
    mem.write(0x400, b"console=ttyS0\0garbage")
    assert mem.read_cstring(0x400) == b"console=ttyS0"
    assert mem.read_cstring(0x400, limit=7) == b"console"   # cut at the limit
    assert mem.read_cstring(0x400, limit=0) == b""
    assert mem.read_cstring(0x40E) == b"garbage"


def test_read_cstring_stops_at_region_end(mem):
    mem.write(MiB - 3, b"abc")   # no terminator before the hole
    assert mem.read_cstring(MiB - 3) == b"abc"
    assert mem.read_cstring(MiB - 3, limit=2) == b"ab"


def test_read_cstring_outside_ram_raises(mem):
    with pytest.raises(GuestMemoryError):
        mem.read_cstring(MiB + 5)


@pytest.mark.parametrize(
    "specs",
    [
        [(0, 2 * MiB), (MiB, MiB)],            # second inside the first
        [(0, MiB), (MiB - PAGE, MiB)],         # partial overlap
        [(MiB, MiB), (0, MiB + PAGE)],         # partial, given out of order
        [(0, MiB), (0, MiB)],                  # identical
        [(0, 4 * MiB), (MiB, PAGE), (2 * MiB, PAGE)],  # one region containing two others
    ],
)
def test_overlapping_regions_rejected(specs):
    regions = [MemoryRegion(base, size) for base, size in specs]
    try:
        with pytest.raises(GuestMemoryError):
            GuestMemory(regions)
    finally:
        for r in regions:
            r.close()


def test_adjacent_regions_accepted():
    with GuestMemory([MemoryRegion(0, MiB), MemoryRegion(MiB, MiB)]) as m:
        # adjacent, but still two regions: an access may not span them
        m.write(MiB - 1, b"a")
        m.write(MiB, b"b")
        with pytest.raises(GuestMemoryError):
            m.read(MiB - 1, 2)


@pytest.mark.parametrize("base, size", [(0, 0), (0, 100), (0x10, PAGE), (0, -PAGE)])
def test_unaligned_or_empty_region_rejected(base, size):
    with pytest.raises(GuestMemoryError):
        MemoryRegion(base, size)


def test_region_is_memfd_backed(mem):
    for region in mem.regions:
        target = os.readlink(f"/proc/self/fd/{region.fd}")
        assert target.startswith("/memfd:"), target
        assert os.fstat(region.fd).st_size == region.size


def test_writes_through_the_fd_are_visible_in_guest_memory(mem):
    region = mem.regions[1]
    os.pwrite(region.fd, b"via-fd", 0x1234)
    assert mem.read(2 * MiB + 0x1234, 6) == b"via-fd"


def test_guest_writes_are_visible_through_the_fd(mem):
    mem.write(0x4321, b"via-guest")
    assert os.pread(mem.regions[0].fd, 9, 0x4321) == b"via-guest"


def test_close_releases_fds():
    m = GuestMemory.from_specs([RegionSpec(0, MiB), RegionSpec(2 * MiB, MiB)])
    fds = [r.fd for r in m.regions]
    assert all(os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:") for fd in fds)
    m.close()
    assert all(r.fd == -1 for r in m.regions)
    for fd in fds:
        # either closed, or already reused for something that is not our memfd
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        assert not target.startswith("/memfd:pyvmm-ram")
    m.close()  # idempotent


def test_from_specs_uses_layout_regions():
    with GuestMemory.from_specs(ram_regions(4 * MiB)) as m:
        assert [(r.guest_base, r.size) for r in m.regions] == [(0, 4 * MiB)]
        m.write_u32(4 * MiB - 4, 0x11223344)
        assert m.read_u32(4 * MiB - 4) == 0x11223344
        with pytest.raises(GuestMemoryError):
            m.read_u8(4 * MiB)


# --- layout: RAM regions and the e820 map ------------------------------------------------


def _regions(size):
    return [(r.guest_base, r.size) for r in ram_regions(size)]


@pytest.mark.parametrize("size", [2 * MiB, 64 * MiB, 256 * MiB, 3 * GiB - 4 * KiB, 3 * GiB])
def test_ram_regions_up_to_low_ram_end_is_one_region(size):
    assert _regions(size) == [(0, size)]


@pytest.mark.parametrize(
    "size, high",
    [(3 * GiB + 4 * KiB, 4 * KiB), (4 * GiB, GiB), (8 * GiB, 5 * GiB), (64 * GiB + 2 * MiB, 61 * GiB + 2 * MiB)],
)
def test_ram_regions_above_low_ram_end_split_around_the_hole(size, high):
    assert layout.LOW_RAM_END == 3 * GiB
    assert _regions(size) == [(0, 3 * GiB), (4 * GiB, high)]
    assert sum(r.size for r in ram_regions(size)) == size


@pytest.mark.parametrize("size", [0, 4 * KiB, 2 * MiB - 4 * KiB, -2 * MiB])
def test_ram_regions_below_minimum_rejected(size):
    with pytest.raises(ValueError):
        ram_regions(size)


@pytest.mark.parametrize("size", [2 * MiB + 1, 2 * MiB + 2048, 3 * GiB + 100, 5 * GiB - 1])
def test_ram_regions_not_4k_multiple_rejected(size):
    with pytest.raises(ValueError):
        ram_regions(size)
    with pytest.raises(ValueError):
        e820_map(size)


RESERVED_LOW = layout.HIGH_MEMORY_START - layout.EBDA_START


def _check_e820(size):
    entries = e820_map(size)
    # sorted, non-empty, non-overlapping
    assert [e.address for e in entries] == sorted(e.address for e in entries)
    assert all(e.size > 0 for e in entries)
    for a, b in zip(entries, entries[1:]):
        assert a.address + a.size <= b.address
    # EBDA .. 1 MiB reserved
    reserved = [e for e in entries if e.kind == E820Entry.RESERVED]
    assert (layout.EBDA_START, RESERVED_LOW) in [(e.address, e.size) for e in reserved]
    # usable RAM is all the RAM but the reserved low area, and lies inside RAM
    usable = [e for e in entries if e.kind == E820Entry.RAM]
    assert sum(e.size for e in usable) == size - RESERVED_LOW
    regions = ram_regions(size)
    for e in usable:
        assert any(r.guest_base <= e.address and e.address + e.size <= r.guest_base + r.size for r in regions)
        assert not (e.address < layout.HIGH_MEMORY_START and e.address + e.size > layout.EBDA_START)
    # nothing usable in the 32-bit MMIO hole
    for e in usable:
        assert e.address + e.size <= layout.LOW_RAM_END or e.address >= layout.MMIO_HOLE_END
    return entries


@pytest.mark.parametrize("size", [2 * MiB, 64 * MiB, 3 * GiB - 4 * KiB, 3 * GiB])
def test_e820_small(size):
    entries = _check_e820(size)
    assert [(e.address, e.size, e.kind) for e in entries] == [
        (0, layout.EBDA_START, 1),
        (layout.EBDA_START, RESERVED_LOW, 2),
        (MiB, size - MiB, 1),
        (layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, 2),
    ]


@pytest.mark.parametrize("size", [3 * GiB + 4 * KiB, 4 * GiB, 16 * GiB])
def test_e820_large(size):
    entries = _check_e820(size)
    assert (entries[-1].address, entries[-1].size, entries[-1].kind) == (4 * GiB, size - 3 * GiB, 1)
    assert (entries[-2].address, entries[-2].size, entries[-2].kind) == (layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, 2)
    assert (entries[-3].address, entries[-3].size) == (MiB, 3 * GiB - MiB)


@given(st.integers(layout.MIN_MEMORY >> 12, (64 * GiB) >> 12))
def test_e820_property(pages):
    _check_e820(pages << 12)


def test_boot_structures_fit_below_the_ebda():
    """Everything pyvmm writes below 1 MiB lies in the usable low RAM of the smallest guest."""
    top_of_tables = layout.PAGE_DIRECTORIES + 4 * 0x1000
    ends = [top_of_tables, layout.MULTIBOOT_INFO + 0x10000, layout.CMDLINE + layout.CMDLINE_MAX]
    assert max(ends) <= layout.EBDA_START
    assert layout.BOOT_STACK_TOP <= layout.PML4
