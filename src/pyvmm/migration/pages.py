"""Guest pages in PAGES frames, read on the source and written on the destination.

A PAGES payload is a run of entries, each `address (u64) | word (u32)`: the low bit of
`word` says the run is zero pages (nothing follows; 4 KiB of zeros is never sent), the rest
is the number of pages in the run; a run that is not zero is followed by its bytes. Runs lie
in one RAM region. The frame flag FIRST_PASS says the destination's memory is still as it
was made (all zero): zero runs need no writing then.

On the source the first pass reads only the data ranges of each region's memfd (SEEK_DATA):
a page the guest never touched is a hole, known zero without reading it (reading it through
the mapping would allocate it).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Callable, Iterable

from .channel import PAGES, Channel, StreamError

PAGE = 4096
ENTRY = struct.Struct("<QI")
FIRST_PASS = 1
ZERO_RUN = 1
BATCH_BYTES = 1 << 20           # a frame's page data, at most
CHUNK_PAGES = 256               # pages compared against zero at once
_ZERO_PAGE = bytes(PAGE)
_ZERO_CHUNK = bytes(PAGE * CHUNK_PAGES)
_MAX_RUN = (1 << 31) - 1


class PageWriter:
    """Collects runs into PAGES frames of about BATCH_BYTES and sends them; `after_frame(bytes)`
    runs after each frame (the bandwidth limit, cancel, progress)."""

    def __init__(self, channel: Channel, after_frame: Callable[[int], None], flags: int = 0) -> None:
        self.channel, self.after_frame, self.flags = channel, after_frame, flags
        self._parts: list[bytes] = []
        self._size = 0
        self.pages = 0
        self.zero_pages = 0

    def zero_run(self, address: int, count: int) -> None:
        while count:
            run = min(count, _MAX_RUN)
            self._parts.append(ENTRY.pack(address, (run << 1) | ZERO_RUN))
            self._size += ENTRY.size
            self.zero_pages += run
            address += run * PAGE
            count -= run
        if len(self._parts) >= 4096:
            self.flush()

    def data_run(self, address: int, data: bytes) -> None:
        count = len(data) // PAGE
        self._parts.append(ENTRY.pack(address, count << 1))
        self._parts.append(data)
        self._size += ENTRY.size + len(data)
        self.pages += count
        if self._size >= BATCH_BYTES:
            self.flush()

    def chunk(self, address: int, data: bytes) -> None:
        """Pages at `address` (whole pages): zero ones as runs of markers, the rest as data."""
        if data == _ZERO_CHUNK[:len(data)]:
            self.zero_run(address, len(data) // PAGE)
            return
        start, zero = 0, data[:PAGE] == _ZERO_PAGE
        for offset in range(PAGE, len(data) + PAGE, PAGE):
            here = offset < len(data) and data[offset:offset + PAGE] == _ZERO_PAGE
            if offset == len(data) or here != zero:
                if zero:
                    self.zero_run(address + start, (offset - start) // PAGE)
                else:
                    self.data_run(address + start, data[start:offset])
                start, zero = offset, here

    def flush(self) -> None:
        if not self._parts:
            return
        payload = b"".join(self._parts)
        self._parts, self._size = [], 0
        self.channel.send(PAGES, payload, self.flags)
        self.after_frame(len(payload))


def send_all_ram(memory, writer: PageWriter) -> None:
    """Every page of guest RAM: the memfd's holes as zero runs, its data ranges read."""
    memory.populate()   # RAM still loading lazily (a uffd restore) has holes that are not zeroes
    for region in memory.regions:
        base, size, view = int(region.guest_base), region.size, region.view
        offset = 0
        for data_start, data_end in _data_ranges(region.fd, size):
            if data_start > offset:
                writer.zero_run(base + offset, (data_start - offset) // PAGE)
            for chunk in range(data_start, data_end, PAGE * CHUNK_PAGES):
                end = min(chunk + PAGE * CHUNK_PAGES, data_end)
                writer.chunk(base + chunk, bytes(view[chunk:end]))
            offset = data_end
        if offset < size:
            writer.zero_run(base + offset, (size - offset) // PAGE)
    writer.flush()


def send_pages(memory, addresses: Iterable[int], writer: PageWriter) -> None:
    """The pages at `addresses` (ascending guest-physical page addresses), contiguous ones
    read together."""
    run_start = run_end = -1
    for address in addresses:
        if address == run_end and run_end - run_start < PAGE * CHUNK_PAGES and memory.contains(run_start, run_end + PAGE - run_start):
            run_end += PAGE
            continue
        if run_start >= 0:
            writer.chunk(run_start, memory.read(run_start, run_end - run_start))
        run_start, run_end = address, address + PAGE
    if run_start >= 0:
        writer.chunk(run_start, memory.read(run_start, run_end - run_start))
    writer.flush()


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `fd` that hold data, page aligned (the whole file if the
    filesystem cannot tell holes)."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:   # no data after offset
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            start -= start % PAGE
            end = min(size, -(-end // PAGE) * PAGE)
            ranges.append((start, end))
            offset = end
    except OSError:
        return [(0, size)]
    return ranges


class PageReceiver:
    """Applies PAGES payloads to the destination's guest memory, checking every run against it."""

    def __init__(self, memory) -> None:
        self.memory = memory
        self.pages = 0

    def apply(self, payload: bytes, flags: int) -> None:
        view = memoryview(payload)
        position = 0
        while position < len(payload):
            if position + ENTRY.size > len(payload):
                raise StreamError("a PAGES frame ends inside an entry")
            address, word = ENTRY.unpack_from(payload, position)
            position += ENTRY.size
            count = word >> 1
            size = count * PAGE
            if address % PAGE or not count or not self.memory.contains(address, size):
                raise StreamError(f"a PAGES frame names {count} pages at {address:#x}, not in this guest's RAM")
            if word & ZERO_RUN:
                if not flags & FIRST_PASS:
                    self.memory.fill(address, size)
            else:
                if position + size > len(payload):
                    raise StreamError("a PAGES frame ends inside a page")
                self.memory.write(address, view[position:position + size])
                position += size
            self.pages += count
