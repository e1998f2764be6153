"""Dirty-page tracking: which guest pages were written since a point in time.

`DirtyBitmap` is the answer (one bit per 4 KiB page of each RAM region, LSB-first, the
layout of KVM's dirty log). `HostWriteTracker` sees every write made through this process's
mapping of guest RAM: the software CPU's translated code (Unicorn maps guest RAM by
pointer), device emulation on any thread, the kernel filling a read(2) buffer there. It uses
userfaultfd's asynchronous write-protection and PAGEMAP_SCAN (memory/userfaultfd.py says
why those). It cannot see writes through another mapping of the same memory: a vhost-user
back-end in another process, or KVM's own writes on behalf of the guest when the host
does not fault them through our page tables; KVM's dirty log covers the guest (accel/kvm).
Where the host lacks what HostWriteTracker needs, KVM's log plus `DeviceWriteLog` (what
device models report writing) still covers a KVM guest. `DirtyRate` turns successive logs
into pages per second, for migration's convergence.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from ..errors import UserError
from . import userfaultfd as uffd
from .guest_memory import GuestMemory

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
# Vm.dirty_log readers: each keeps its own log of one tracking.
SNAPSHOT_READER = "snapshot"    # Diff snapshots (machine-config track_dirty_pages starts it)
MIGRATION_READER = "migration"  # pre-copy rounds
_CHUNK = 64  # bytes of bitmap read as one int when listing pages (512 pages)


class DirtyTrackingUnavailable(UserError):
    """This host (or this machine) cannot track the pages written to guest RAM; the message
    is one line saying why."""


class _Region(Protocol):
    @property
    def guest_base(self) -> int: ...

    @property
    def size(self) -> int: ...


class _Memory(Protocol):
    @property
    def regions(self) -> Sequence[_Region]: ...


class DirtyBitmap:
    """Per RAM region (by guest-physical base): a bytearray, one bit per 4 KiB page,
    LSB-first (page i of the region is bit i % 8 of byte i // 8)."""

    def __init__(self, layout: dict[int, int]) -> None:
        """`layout`: guest_base -> size in bytes of each RAM region (page multiples). Empty."""
        self.sizes = {int(base): size for base, size in sorted(layout.items())}
        for base, size in self.sizes.items():
            if base % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise ValueError(f"RAM region {base:#x}+{size:#x} is not page aligned")
        self.regions = {base: bytearray((size // PAGE_SIZE + 7) // 8) for base, size in self.sizes.items()}

    @classmethod
    def empty(cls, memory: _Memory) -> "DirtyBitmap":
        return cls({int(r.guest_base): r.size for r in memory.regions})

    @classmethod
    def full(cls, memory: _Memory) -> "DirtyBitmap":
        """Every page of `memory` dirty (what a first pass or a Full snapshot sends)."""
        bitmap = cls.empty(memory)
        for base, size in bitmap.sizes.items():
            bitmap._mark_pages(base, 0, size // PAGE_SIZE)
        return bitmap

    def same_layout(self, other: "DirtyBitmap") -> bool:
        return self.sizes == other.sizes

    # --- marking -------------------------------------------------------------------------

    def _region_of(self, address: int) -> int:
        for base, size in self.sizes.items():
            if base <= address < base + size:
                return base
        raise ValueError(f"guest address {address:#x} is outside guest RAM")

    def mark(self, address: int, length: int = 1) -> None:
        """Mark the pages of [address, address+length) dirty (the range lies in one region)."""
        if length <= 0:
            return
        base = self._region_of(address)
        if address + length > base + self.sizes[base]:
            raise ValueError(f"guest range {address:#x}+{length:#x} crosses the end of its RAM region")
        self._mark_pages(base, (address - base) >> PAGE_SHIFT, ((address + length - 1 - base) >> PAGE_SHIFT) + 1)

    def _mark_pages(self, base: int, first: int, end: int) -> None:
        """Set bits [first, end) of region `base`."""
        bits = self.regions[base]
        while first < end and first % 8:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        whole_end = first + (end - first) // 8 * 8
        if whole_end > first:
            bits[first >> 3:whole_end >> 3] = b"\xff" * ((whole_end - first) >> 3)
        for page in range(whole_end, end):
            bits[page >> 3] |= 1 << (page & 7)

    def merge(self, other: "DirtyBitmap") -> "DirtyBitmap":
        """OR `other` (same layout) into this bitmap; returns self."""
        if not self.same_layout(other):
            raise ValueError("dirty bitmaps of different RAM layouts cannot be merged")
        for base, bits in self.regions.items():
            self.regions[base] = _or(bits, other.regions[base])
        return self

    def merge_words(self, base: int, words: bytes | bytearray | memoryview) -> None:
        """OR a region's bitmap in KVM's layout (64-bit little-endian words, LSB-first)."""
        bits = self.regions[base]
        self.regions[base] = _or(bits, bytes(words)[:len(bits)])

    def clear(self) -> None:
        for bits in self.regions.values():
            bits[:] = bytes(len(bits))

    # --- reading -------------------------------------------------------------------------

    def is_dirty(self, address: int) -> bool:
        base = self._region_of(address)
        page = (address - base) >> PAGE_SHIFT
        return bool(self.regions[base][page >> 3] >> (page & 7) & 1)

    __contains__ = is_dirty

    def count(self) -> int:
        return sum(int.from_bytes(bits, "little").bit_count() for bits in self.regions.values())

    def __bool__(self) -> bool:
        return any(any(bits) for bits in self.regions.values())

    def pages(self) -> Iterator[int]:
        """Guest-physical addresses of the dirty pages, ascending."""
        for base, bits in self.regions.items():
            for chunk_start in range(0, len(bits), _CHUNK):
                value = int.from_bytes(bits[chunk_start:chunk_start + _CHUNK], "little")
                first = chunk_start << 3
                while value:  # clean chunks cost one comparison
                    low = value & -value
                    yield base + ((first + low.bit_length() - 1) << PAGE_SHIFT)
                    value ^= low

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Runs of contiguous dirty pages as (guest address, length in bytes), ascending."""
        start = end = -1
        for address in self.pages():
            if address == end:
                end += PAGE_SIZE
                continue
            if start >= 0:
                yield start, end - start
            start, end = address, address + PAGE_SIZE
        if start >= 0:
            yield start, end - start

    def copy(self) -> "DirtyBitmap":
        twin = DirtyBitmap(self.sizes)
        for base, bits in self.regions.items():
            twin.regions[base][:] = bits
        return twin

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DirtyBitmap) and self.sizes == other.sizes and self.regions == other.regions

    def __repr__(self) -> str:
        return f"DirtyBitmap({self.count()} of {sum(self.sizes.values()) // PAGE_SIZE} pages dirty)"


def _or(a: bytearray, b: bytes | bytearray) -> bytearray:
    size = len(a)
    value = int.from_bytes(a, "little") | int.from_bytes(b, "little")
    return bytearray(value.to_bytes(max(size, len(b)), "little")[:size])


# --- the host side: every write through this process's mapping ------------------------------

_NEEDED = {
    uffd.UFFD_FEATURE_WP_ASYNC: "asynchronous write-protection (UFFD_FEATURE_WP_ASYNC, Linux 6.7+; "
                                "Debian 12's 6.1 kernel lacks it)",
    uffd.UFFD_FEATURE_WP_HUGETLBFS_SHMEM: "write-protection of shared memory (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, Linux 5.19+)",
    uffd.UFFD_FEATURE_WP_UNPOPULATED: "write-protection of pages never touched (UFFD_FEATURE_WP_UNPOPULATED, Linux 6.7+)",
}


def host_tracking_problem() -> str | None:
    """Why this host cannot track writes to guest RAM (one line), or None if it can."""
    try:
        features = uffd.available_features(user_mode_only=True)
    except uffd.HostMemoryError as exc:
        return f"this host offers no userfaultfd ({exc.strerror}), which dirty-page tracking needs"
    for feature, what in _NEEDED.items():
        if not features & feature:
            return f"this host kernel's userfaultfd has no {what}, which dirty-page tracking needs"
    try:
        scanner = uffd.PagemapScanner(capacity=1)
    except uffd.HostMemoryError as exc:
        return f"cannot open /proc/self/pagemap ({exc.strerror}), which dirty-page tracking needs"
    try:
        if not scanner.supported():
            return "this host kernel has no PAGEMAP_SCAN on /proc/self/pagemap (Linux 6.7+), which dirty-page tracking needs"
    finally:
        scanner.close()
    return None


class _HostRegion(_Region, Protocol):
    @property
    def host_address(self) -> int: ...


class _HostMemory(Protocol):
    @property
    def regions(self) -> Sequence[_HostRegion]: ...


class HostWriteTracker:
    """Pages of guest RAM written through this process's mapping since start or the last
    collect(). Writers need no cooperation: the kernel clears a page's write-protection on
    the first write (asynchronous mode: no fault reaches us) and PAGEMAP_SCAN reports it."""

    def __init__(self, memory: _HostMemory) -> None:
        problem = host_tracking_problem()
        if problem is not None:
            raise DirtyTrackingUnavailable(problem)
        self._spans = [(int(r.guest_base), r.host_address, r.size) for r in memory.regions]
        self._layout = {base: size for base, _, size in self._spans}
        self._lock = threading.Lock()
        self._fd = uffd.open_userfaultfd(user_mode_only=True)
        self._scanner: uffd.PagemapScanner | None = None
        registered: list[tuple[int, int]] = []
        try:
            uffd.handshake(self._fd, sum(_NEEDED))
            for _, host, size in self._spans:
                uffd.register(self._fd, host, size, uffd.UFFDIO_REGISTER_MODE_WP)
                registered.append((host, size))
                uffd.write_protect(self._fd, host, size)
            self._scanner = uffd.PagemapScanner()
        except uffd.HostMemoryError as exc:
            self._release(registered)
            raise DirtyTrackingUnavailable(f"cannot write-protect guest RAM to track dirty pages: {exc}") from None

    def collect(self, into: DirtyBitmap | None = None) -> DirtyBitmap:
        """OR the pages written since the last collect (or start) into `into` (a new bitmap by
        default) and start over; returns the bitmap. Safe while writers run (any thread)."""
        bitmap = into if into is not None else DirtyBitmap(self._layout)
        with self._lock:
            scanner = self._scanner
            if scanner is None:
                raise RuntimeError("the dirty-page tracker was stopped")
            for base, host, size in self._spans:
                for first, end in scanner.take_written(host, host + size):
                    bitmap._mark_pages(base, (first - host) >> PAGE_SHIFT, (end - host + PAGE_SIZE - 1) >> PAGE_SHIFT)
        return bitmap

    def close(self) -> None:
        """Stop tracking: the pages lose their protection; writes cost nothing again."""
        with self._lock:
            if self._scanner is None:
                return
            self._scanner.close()
            self._scanner = None
            self._release([(host, size) for _, host, size in self._spans])

    def _release(self, registered: list[tuple[int, int]]) -> None:
        for host, size in registered:
            try:
                uffd.unregister(self._fd, host, size)  # also drops the protection of every page
            except uffd.HostMemoryError:
                pass  # closing the fd below unregisters too
        os.close(self._fd)
        self._fd = -1


class DeviceWriteLog:
    """Where the host cannot write-protect (Linux before 6.7) but the accelerator logs what the
    guest writes (KVM's dirty log), the rest is what device models write: the buffers of each
    request they complete (reported through GuestMemory.on_device_writes, as virtqueue.push
    does) and the used rings of their virtqueues (`used_rings()`: (address, length) of each
    ring a device may write, marked at every collection). No device in this process writes
    guest RAM otherwise; a vhost-user back-end does (the Vm refuses those)."""

    def __init__(self, memory: GuestMemory, used_rings: Callable[[], Iterable[tuple[int, int]]]) -> None:
        self._memory = memory
        self._used_rings = used_rings
        self._lock = threading.Lock()
        self._bitmap = DirtyBitmap.empty(memory)
        self._previous = memory.on_device_writes  # chained: the software CPU's code invalidation
        memory.on_device_writes = self._note

    def _note(self, runs: list[tuple[int, int]]) -> None:
        if self._previous is not None:
            self._previous(runs)
        with self._lock:
            for address, length in runs:
                self._bitmap.mark(address, length)

    def collect(self, into: DirtyBitmap | None = None) -> DirtyBitmap:
        with self._lock:
            taken, self._bitmap = self._bitmap, DirtyBitmap.empty(self._memory)
        for address, length in self._used_rings():
            taken.mark(address, length)
        return taken if into is None else into.merge(taken)

    def close(self) -> None:
        if self._memory.on_device_writes == self._note:
            self._memory.on_device_writes = self._previous


class DirtyRate:
    """Pages dirtied per second, from the logs collected over a sliding window (default 3 s):
    what pre-copy migration needs to predict whether the next pass converges."""

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, float, int]] = deque()  # (interval begin, end, pages)
        self._last: float | None = None  # when the previous log was collected (or tracking began)

    def start(self, now: float | None = None) -> None:
        self._samples.clear()
        self._last = time.monotonic() if now is None else now

    def add(self, pages: int, now: float | None = None) -> None:
        """A log of `pages` dirty pages was just collected; it covers the time since the
        previous one (or start())."""
        now = time.monotonic() if now is None else now
        if self._last is not None:
            self._samples.append((self._last, now, pages))
        self._last = now
        while len(self._samples) > 1 and self._samples[0][1] < now - self.window:
            self._samples.popleft()

    def pages_per_second(self) -> float | None:
        """The rate over the window, or None before the first log after start()."""
        if not self._samples:
            return None
        elapsed = self._samples[-1][1] - self._samples[0][0]
        if elapsed <= 0:
            return None
        return sum(pages for _, _, pages in self._samples) / elapsed
