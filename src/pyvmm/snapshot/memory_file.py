"""The memory file: guest RAM as a sparse file, zero pages as holes.

Layout: the RAM regions one after another in guest-physical order, each page at
(the region's offset in the file) + (its offset in the region); the file's size is all of
RAM. A Full file has every non-zero page as data and every zero page as a hole. A Diff file
has the same size and holds, as data, exactly the pages written since the previous snapshot
(zero or not): its holes mean "as in the base", so it is only meaningful merged onto the
Full file it follows (merge_diff), as Firecracker's diff snapshots are.

Holes are found with SEEK_DATA/SEEK_HOLE, on the memory file and on guest RAM's own memfd
(pages the guest never touched are holes there too, and reading them would allocate them).
A Diff is only written where the filesystem reports holes page by page, which it checks.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any, Iterable, Iterator, Protocol

from ..errors import UserError
from ..memory import GuestMemory, MemoryRegion
from ..persist import StateError

PAGE = mmap.PAGESIZE
_ZERO_PAGE = bytes(PAGE)
_SCAN_CHUNK = 16 * PAGE          # checked as one piece first: most of a guest's RAM is all-zero or none
_ZERO_CHUNK = bytes(_SCAN_CHUNK)
_IO_CHUNK = 64 << 20             # one preadv/pwrite at most (the kernel caps one call below 2 GiB)
WRITEBACK_BYTES = 8 << 20        # a memory file's disk writes are started every this many bytes
_SYNC_FILE_RANGE_WRITE = 2


class MemoryFileError(UserError):
    """A memory file that cannot be written, read or merged (one line, naming the file)."""


class DirtyPages(Protocol):
    """What a Diff needs of pyvmm.memory.dirty.DirtyBitmap: the dirty guest-physical page
    addresses, ascending."""

    def pages(self) -> Iterable[int]: ...


def file_layout(regions: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(guest_base, size, file_offset) of each region, in guest-physical order."""
    layout, offset = [], 0
    for base, size in sorted(regions):
        layout.append((base, size, offset))
        offset += size
    return layout


def memory_regions(memory: GuestMemory) -> list[tuple[int, int]]:
    return [(int(region.guest_base), region.size) for region in memory.regions]


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[a, b) ranges of `fd` between start and end that hold data (SEEK_DATA/SEEK_HOLE)."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after `position`
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        position = hole


def _resident_ranges(region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """Offsets in `region` that may hold non-zero bytes: the memfd's data, or all of a region
    that has no memfd (a copy-on-write mapping of a file)."""
    if region.fd >= 0:
        yield from data_ranges(region.fd, 0, region.size)
    else:
        yield 0, region.size


def _nonzero_runs(buffer: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[a, b) runs of whole pages between start and end of `buffer` that are not all zero.
    mmap slices are bytes, compared with memcmp (a memoryview compares byte by byte)."""
    run_start = None
    for chunk in range(start, end, _SCAN_CHUNK):
        chunk_end = min(chunk + _SCAN_CHUNK, end)
        if chunk_end - chunk == _SCAN_CHUNK and buffer[chunk:chunk_end] == _ZERO_CHUNK:
            if run_start is not None:
                yield run_start, chunk
                run_start = None
            continue
        for page in range(chunk, chunk_end, PAGE):
            if buffer[page:page + PAGE] == _ZERO_PAGE:
                if run_start is not None:
                    yield run_start, page
                    run_start = None
            elif run_start is None:
                run_start = page
    if run_start is not None:
        yield run_start, end


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view[:_IO_CHUNK], offset)
        view, offset = view[written:], offset + written


class _Writeback:
    """Starts the disk writes of what was written so far every WRITEBACK_BYTES
    (sync_file_range(SYNC_FILE_RANGE_WRITE): asynchronous), so the disk works while the rest
    is copied and the closing fsync has little left to wait for. Where the call is missing,
    the fsync does all of it, as before."""

    _call: Any = None

    def __init__(self, fd: int) -> None:
        self.fd, self.pending = fd, 0

    def wrote(self, count: int) -> None:
        self.pending += count
        if self.pending >= WRITEBACK_BYTES:
            self.pending = 0
            call = _Writeback._call
            if call is None:
                _Writeback._call = call = _sync_file_range()
            if call:
                call(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)   # errors: the fsync still follows


def _sync_file_range():
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _preadv_all(fd: int, view: memoryview, offset: int, source: str) -> None:
    while view:
        got = os.preadv(fd, [view[:_IO_CHUNK]], offset)
        if got == 0:
            raise MemoryFileError(f"{source}: ends early, at byte {offset}")
        view, offset = view[got:], offset + got


class _NewFile:
    """A file written beside `path` and renamed over it once complete (fsynced): a failure
    leaves whatever `path` was."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.temporary = path, f"{path}.tmp{os.getpid()}"
        try:
            self.fd = os.open(self.temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self._discard()
            raise MemoryFileError(f"{path}: cannot write the memory file: {exc.strerror}") from None

    def __enter__(self) -> "_NewFile":
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        if kind is not None:
            self._discard()
            if isinstance(exc, OSError):
                raise MemoryFileError(f"{self.path}: cannot write the memory file: {exc.strerror}") from None
            return
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.temporary, self.path)
        except OSError as error:
            self._discard()
            raise MemoryFileError(f"{self.path}: cannot write the memory file: {error.strerror}") from None

    def _discard(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.temporary)
        except OSError:
            pass


def write_full(memory: GuestMemory, path: str) -> int:
    """Write all of guest RAM to `path`, zero pages as holes; the number of data bytes written.
    Lazily loaded RAM is loaded completely first (memory.populate())."""
    memory.populate()
    written = 0
    layout = file_layout(memory_regions(memory))
    with _NewFile(path, sum(size for _, size, _ in layout)) as out:
        writeback = _Writeback(out.fd)
        for region, (_, _, file_offset) in zip(memory.regions, layout):
            for start, end in _resident_ranges(region):
                for run_start, run_end in _nonzero_runs(region.mmap, start, end):
                    _pwrite_all(out.fd, region.view[run_start:run_end], file_offset + run_start)
                    written += run_end - run_start
                    writeback.wrote(run_end - run_start)
    return written


def write_diff(memory: GuestMemory, path: str, dirty: DirtyPages) -> int:
    """Write the pages `dirty` names (zero or not) to `path`, every other page a hole; the
    number of data bytes written. Refused where the filesystem does not keep those holes page
    by page (a merge would then copy zeroes over the base)."""
    memory.populate()
    layout = file_layout(memory_regions(memory))
    runs = _file_runs(dirty.pages(), layout)
    regions = {int(region.guest_base): region for region in memory.regions}
    written = 0
    with _NewFile(path, sum(size for _, size, _ in layout)) as out:
        writeback = _Writeback(out.fd)
        for file_start, file_end, base, region_start in runs:
            _pwrite_all(out.fd, regions[base].view[region_start:region_start + file_end - file_start], file_start)
            written += file_end - file_start
            writeback.wrote(file_end - file_start)
        os.fsync(out.fd)
        found = list(data_ranges(out.fd, 0, os.fstat(out.fd).st_size))
        if found != _coalesced((start, end) for start, end, _, _ in runs):
            raise MemoryFileError(f"{path}: this filesystem does not keep a Diff snapshot's holes page by page "
                                  "(a Diff needs one that does: ext4, xfs, btrfs, tmpfs)")
    return written


def _coalesced(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ascending [a, b) ranges with the ones that touch joined, as SEEK_DATA reports them."""
    joined: list[tuple[int, int]] = []
    for start, end in ranges:
        if joined and joined[-1][1] == start:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined


def _file_runs(pages: Iterable[int], layout: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Consecutive dirty pages as (file_start, file_end, region's guest_base, offset in the
    region) runs, ascending; runs never span two regions."""
    runs: list[list[int]] = []
    for address in pages:
        for base, size, offset in layout:
            if base <= address < base + size:
                break
        else:
            raise MemoryFileError(f"dirty page {address:#x} is outside guest RAM")
        if address % PAGE:
            raise MemoryFileError(f"dirty page address {address:#x} is not page aligned")
        file_start = offset + address - base
        last = runs[-1] if runs else None
        if last is not None and file_start < last[1]:
            raise MemoryFileError("dirty pages must come in ascending order, each once")
        if last is not None and last[1] == file_start and last[2] == base:
            last[1] += PAGE
        else:
            runs.append([file_start, file_start + PAGE, base, address - base])
    return [(start, end, base, region_start) for start, end, base, region_start in runs]


def open_memory_file(path: str, regions: Iterable[tuple[int, int]]) -> int:
    """`path` opened for reading, its size checked against the RAM `regions` it must hold."""
    expected = sum(size for _, size in regions)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StateError(f"{path}: {exc.strerror}") from None
    size = os.fstat(fd).st_size
    if size != expected:
        os.close(fd)
        raise StateError(f"{path}: the memory file holds {size} bytes, the snapshot's guest RAM is "
                         f"{expected} bytes ({expected >> 20} MiB)")
    return fd


def read_into(memory: GuestMemory, fd: int, source: str) -> int:
    """Copy the memory file `fd` into `memory` (fresh, all zero), skipping its holes; the
    number of data bytes read."""
    read = 0
    for region, (_, size, file_offset) in zip(memory.regions, file_layout(memory_regions(memory))):
        for start, end in data_ranges(fd, file_offset, file_offset + size):
            _preadv_all(fd, region.view[start - file_offset:end - file_offset], start, source)
            read += end - start
    return read


def merge_diff(diff_path: str, base_path: str) -> int:
    """Copy the data of the Diff memory file `diff_path` onto the Full one `base_path` (which
    then holds the state the diff was taken at); the number of bytes copied."""
    try:
        diff = os.open(diff_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MemoryFileError(f"{diff_path}: {exc.strerror}") from None
    try:
        try:
            base = os.open(base_path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MemoryFileError(f"{base_path}: {exc.strerror}") from None
        try:
            size, base_size = os.fstat(diff).st_size, os.fstat(base).st_size
            if size != base_size:
                raise MemoryFileError(f"{diff_path}: the diff is {size} bytes, its base {base_path} is {base_size}: "
                                      "not the same machine's memory")
            copied = 0
            for start, end in data_ranges(diff, 0, size):
                position = start
                while position < end:
                    done = os.copy_file_range(diff, base, min(end - position, _IO_CHUNK), position, position)
                    if done == 0:
                        raise MemoryFileError(f"{diff_path}: ends early, at byte {position}")
                    position += done
                copied += end - start
            os.fsync(base)
            return copied
        except OSError as exc:
            raise MemoryFileError(f"merging {diff_path} onto {base_path}: {exc.strerror}") from None
        finally:
            os.close(base)
    finally:
        os.close(diff)
