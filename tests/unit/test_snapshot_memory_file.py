"""The memory file: guest RAM written sparsely (zero pages are holes, seen with SEEK_DATA and
SEEK_HOLE), read back into fresh RAM; a Diff holds exactly the dirty pages and merges onto
its base; a file of the wrong size is refused with one line."""

from __future__ import annotations

import os

import pytest

from pyvmm.memory.guest_memory import GuestMemory, RegionSpec
from pyvmm.persist import StateError
from pyvmm.snapshot import memory_file
from pyvmm.snapshot.memory_file import (PAGE, MemoryFileError, data_ranges, merge_diff, open_memory_file, read_into,
                                        write_diff, write_full)

MiB = 1 << 20
# Two regions with a gap between them, as RAM around the 32-bit hole: file offsets differ from addresses.
SPECS = [RegionSpec(0, 2 * MiB), RegionSpec(8 * MiB, 1 * MiB)]
REGIONS = [(s.guest_base, s.size) for s in SPECS]


class Pages:
    def __init__(self, pages):
        self._pages = list(pages)

    def pages(self):
        return iter(self._pages)


@pytest.fixture
def memory():
    with GuestMemory.from_specs(SPECS) as ram:
        yield ram


def _fill(memory: GuestMemory) -> None:
    memory.write(0x1000, b"first page")
    memory.write(0x5000, bytes(range(256)) * 16)                 # one whole page
    memory.write(0x6FFF, b"\xaa\xbb")                            # across two pages
    memory.write(2 * MiB - 8, b"lastlast")                       # the low region's last page
    memory.write(8 * MiB + 0x3000, b"high region")


def _snapshot_of(memory: GuestMemory) -> bytes:
    return b"".join(bytes(region.view) for region in memory.regions)


def test_full_file_holds_nonzero_pages_as_data_and_zero_pages_as_holes(memory, tmp_path):
    _fill(memory)
    memory.write(0x9000, b"x")
    memory.write(0x9000, b"\0")               # touched, but zero again: a hole in the file
    path = str(tmp_path / "vm.mem")
    written = write_full(memory, path)
    assert os.path.getsize(path) == 3 * MiB
    fd = os.open(path, os.O_RDONLY)
    try:
        ranges = list(data_ranges(fd, 0, 3 * MiB))
    finally:
        os.close(fd)
    high = 2 * MiB   # the high region's offset in the file
    assert ranges == [(0x1000, 0x2000), (0x5000, 0x8000), (2 * MiB - PAGE, 2 * MiB), (high + 0x3000, high + 0x4000)]
    assert written == sum(end - start for start, end in ranges)
    assert os.stat(path).st_blocks * 512 < 64 << 10                  # sparse on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.mem"]  # no temporary left behind


def test_writing_does_not_allocate_the_guests_untouched_ram(memory, tmp_path):
    """Pages the guest never touched are holes in its memfd; reading them would allocate them."""
    _fill(memory)
    before = [list(data_ranges(r.fd, 0, r.size)) for r in memory.regions]
    write_full(memory, str(tmp_path / "vm.mem"))
    assert [list(data_ranges(r.fd, 0, r.size)) for r in memory.regions] == before


def test_read_back_into_fresh_ram_is_identical(memory, tmp_path):
    _fill(memory)
    path = str(tmp_path / "vm.mem")
    write_full(memory, path)
    fd = open_memory_file(path, REGIONS)
    try:
        with GuestMemory.from_specs(SPECS) as copy:
            read = read_into(copy, fd, path)
            assert read == 6 * PAGE
            # holes in the file were skipped: the copy's memfd holds only the data pages
            assert sum(e - s for r in copy.regions for s, e in data_ranges(r.fd, 0, r.size)) == 6 * PAGE
            assert _snapshot_of(copy) == _snapshot_of(memory)
    finally:
        os.close(fd)


def test_a_memory_file_of_the_wrong_size_is_refused(memory, tmp_path):
    path = tmp_path / "vm.mem"
    path.write_bytes(bytes(3 * MiB - PAGE))
    with pytest.raises(StateError, match=rf"^{path}: the memory file holds {3 * MiB - PAGE} bytes, the snapshot's "
                                         rf"guest RAM is {3 * MiB} bytes \(3 MiB\)$"):
        open_memory_file(str(path), REGIONS)
    with pytest.raises(StateError, match=r"^/nonexistent\.mem: No such file or directory$"):
        open_memory_file("/nonexistent.mem", REGIONS)


def test_a_diff_holds_exactly_the_dirty_pages_and_merges_onto_its_base(memory, tmp_path):
    _fill(memory)
    base = str(tmp_path / "base.mem")
    write_full(memory, base)
    memory.write(0x1000, b"FIRST")            # changed
    memory.fill(0x5000, PAGE)                 # a data page zeroed: must reach the base as zeroes
    memory.write(0x20000, b"new page")        # a page that was a hole
    memory.write(8 * MiB + 0x7000, b"high")
    dirty = [0x1000, 0x5000, 0x20000, 8 * MiB + 0x7000]
    diff = str(tmp_path / "vm.diff")
    assert write_diff(memory, diff, Pages(dirty)) == 4 * PAGE
    fd = os.open(diff, os.O_RDONLY)
    try:
        high = 2 * MiB
        assert list(data_ranges(fd, 0, 3 * MiB)) == [(0x1000, 0x2000), (0x5000, 0x6000), (0x20000, 0x21000),
                                                     (high + 0x7000, high + 0x8000)]
    finally:
        os.close(fd)
    assert os.path.getsize(diff) == 3 * MiB
    assert merge_diff(diff, base) == 4 * PAGE
    fd = open_memory_file(base, REGIONS)
    try:
        with GuestMemory.from_specs(SPECS) as merged:
            read_into(merged, fd, base)
            assert _snapshot_of(merged) == _snapshot_of(memory)
    finally:
        os.close(fd)


def test_adjacent_dirty_pages_are_written_as_one_run_and_regions_stay_apart(memory, tmp_path):
    """The low region's last page and the high region's first are adjacent in the file."""
    memory.write(2 * MiB - PAGE, b"a")
    memory.write(8 * MiB, b"b")
    diff = str(tmp_path / "vm.diff")
    write_diff(memory, diff, Pages([0, PAGE, 2 * PAGE, 2 * MiB - PAGE, 8 * MiB]))
    fd = os.open(diff, os.O_RDONLY)
    try:
        assert list(data_ranges(fd, 0, 3 * MiB)) == [(0, 3 * PAGE), (2 * MiB - PAGE, 2 * MiB + PAGE)]
    finally:
        os.close(fd)


def test_bad_dirty_pages_are_refused(memory, tmp_path):
    diff = str(tmp_path / "vm.diff")
    for pages, message in (([4 * MiB], r"^dirty page 0x400000 is outside guest RAM$"),
                           ([0x1001], r"^dirty page address 0x1001 is not page aligned$"),
                           ([0x2000, 0x1000], r"^dirty pages must come in ascending order, each once$"),
                           ([0x1000, 0x1000], r"^dirty pages must come in ascending order, each once$")):
        with pytest.raises(MemoryFileError, match=message):
            write_diff(memory, diff, Pages(pages))
    assert list(tmp_path.iterdir()) == []


def test_a_filesystem_that_loses_holes_is_refused_for_a_diff(memory, tmp_path, monkeypatch):
    """Where SEEK_DATA reports the whole file as data, a merge would copy zeroes over the base."""
    memory.write(0x1000, b"x")
    monkeypatch.setattr(memory_file, "data_ranges", lambda fd, start, end: iter([(start, end)]))
    diff = tmp_path / "vm.diff"
    with pytest.raises(MemoryFileError, match=rf"^{diff}: this filesystem does not keep a Diff snapshot's holes"):
        write_diff(memory, str(diff), Pages([0x1000]))
    assert list(tmp_path.iterdir()) == []      # nothing half-written left


def test_merging_mismatched_files_is_refused(tmp_path):
    base, diff = tmp_path / "base.mem", tmp_path / "vm.diff"
    base.write_bytes(bytes(2 * PAGE))
    diff.write_bytes(bytes(3 * PAGE))
    with pytest.raises(MemoryFileError, match=rf"^{diff}: the diff is {3 * PAGE} bytes, its base {base} is "
                                              rf"{2 * PAGE}: not the same machine's memory$"):
        merge_diff(str(diff), str(base))
    assert base.read_bytes() == bytes(2 * PAGE)
    with pytest.raises(MemoryFileError, match=r"^/nonexistent\.diff: No such file or directory$"):
        merge_diff("/nonexistent.diff", str(base))


def test_a_failed_write_leaves_the_old_file(memory, tmp_path):
    path = tmp_path / "vm.mem"
    path.write_bytes(b"old")
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):   # root ignores the mode: make the temporary's name a directory
            os.chmod(tmp_path, 0o700)
            (tmp_path / f"vm.mem.tmp{os.getpid()}").mkdir()
        with pytest.raises(MemoryFileError, match=rf"^{path}: cannot write the memory file: "):
            write_full(memory, str(path))
    finally:
        os.chmod(tmp_path, 0o700)
    assert path.read_bytes() == b"old"


def test_disk_writes_are_started_as_the_file_is_written_and_it_still_reads_back(memory, tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES of data the memory file's writeback is started (asynchronously),
    Full and Diff alike; the file is the same as without."""
    calls: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(memory_file, "WRITEBACK_BYTES", PAGE)
    monkeypatch.setattr(memory_file._Writeback, "_call", lambda *args: calls.append(args) or 0)
    _fill(memory)
    path = str(tmp_path / "vm.mem")
    assert write_full(memory, path) == 6 * PAGE
    assert len(calls) == 4 and all(args[1:] == (0, 0, 2) for args in calls)   # one per run of pages
    write_diff(memory, str(tmp_path / "vm.diff"), Pages([0x1000, 0x2000, 8 * MiB]))
    assert len(calls) == 6
    fd = open_memory_file(path, REGIONS)
    try:
        with GuestMemory.from_specs(SPECS) as copy:
            read_into(copy, fd, path)
            assert _snapshot_of(copy) == _snapshot_of(memory)
    finally:
        os.close(fd)


def test_the_real_writeback_call_is_there_on_linux():
    function = memory_file._sync_file_range()
    assert function and function(-1, 0, 0, 2) == -1      # EBADF: the call exists and is made
