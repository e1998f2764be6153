"""Guest RAM: memfd-backed regions, shared mappings, bounds-checked access.

memfd (not anonymous memory) so that a snapshot can write the file out and a
vhost-user back-end can map the same pages through fd passing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from dataclasses import dataclass
from typing import Callable, Final

from ..compiled import mypyc_attr
from ..errors import UserError
from .address import GuestAddress
from .backing import DEFAULT_BACKING, HUGETLB_PAGE, Backing, apply_advice


_LITTLE_ENDIAN: Final = sys.byteorder == "little"  # the word views are native-endian; guest memory is little-endian
_LOAD_BY_PWRITE: Final = 64 << 10  # smaller loads go through the mapping: a system call saves nothing there
_libc = ctypes.CDLL(None, use_errno=True)  # mincore(2): resident pages, for stats


def _outside(address: int, size: int) -> "GuestMemoryError":
    return GuestMemoryError(f"guest access {address:#x}+{size:#x} is outside guest RAM")


class GuestMemoryError(UserError):
    """A guest-physical access outside RAM, or RAM that could not be created."""


@dataclass(frozen=True)
class RegionSpec:
    """Where one RAM region sits in the guest-physical space."""

    guest_base: int
    size: int


class MemoryRegion:
    """One contiguous guest-physical RAM range. By default a shared mapping of a memfd of its
    own (`fd`), which a vhost-user back-end can map too. With `file=(fd, offset)`: a private
    copy-on-write mapping of that file from `offset`, read from the file page by page on
    first touch, written privately; such a region has no fd to share (`fd` is -1) and the
    file must not change while it is mapped."""

    def __init__(self, guest_base: int, size: int, *, name: str = "pyvmm-ram",
                 file: tuple[int, int] | None = None, backing: Backing = DEFAULT_BACKING) -> None:
        if size <= 0 or size % mmap.PAGESIZE or guest_base % mmap.PAGESIZE:
            raise GuestMemoryError(f"RAM region {guest_base:#x}+{size:#x} is not page aligned")
        self.guest_base = GuestAddress(guest_base)
        self.size = size
        self.fd = -1
        self.backing = backing
        # the unit a discard frees: a huge page cannot be returned in part
        self.discard_unit = HUGETLB_PAGE if backing.hugetlb and file is None else mmap.PAGESIZE
        try:
            if file is not None:
                self.mmap = mmap.mmap(file[0], size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE,
                                      offset=file[1])
            elif backing.anonymous:
                self.mmap = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                self.fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_HUGETLB if backing.hugetlb else 0))
                os.ftruncate(self.fd, size)
                self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            apply_advice(self.mmap, backing)
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
            what = " on hugetlb pages (too few reserved?)" if backing.hugetlb else ""
            raise GuestMemoryError(f"cannot allocate {size >> 20} MiB of guest RAM{what}: {exc.strerror}") from None
        self.view = memoryview(self.mmap)
        # u16, u32 and u64 views: an aligned store through one is one store of the whole value
        self.words = (self.view.cast("H"), self.view.cast("I"), self.view.cast("Q"))
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self.mmap)
        self.host_address = ctypes.addressof(self._anchor)
        self._closed = False

    @property
    def shared(self) -> bool:
        """Whether another process can map this RAM through `fd` (a memfd region)."""
        return self.fd >= 0

    @property
    def guest_end(self) -> int:
        return self.guest_base + self.size

    def contains(self, address: int, size: int = 1) -> bool:
        base = int(self.guest_base)
        return base <= address and address + size <= base + self.size

    def resident_bytes(self) -> int:
        """How much of the region is in host RAM now (mincore over the mapping: pages the guest
        or a device touched, not swapped out)."""
        page = mmap.PAGESIZE
        vector = (ctypes.c_ubyte * ((self.size + page - 1) // page))()
        if _libc.mincore(ctypes.c_void_p(self.host_address), ctypes.c_size_t(self.size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(byte & 1 for byte in bytes(vector)) * page

    def discard(self, offset: int, length: int) -> int:
        """Give [offset, offset+length) of the region back to the host: the pages read as zero
        afterwards (or, in a private copy of a file, as the file's bytes) and take no host RAM
        until touched again. Only whole discard units inside the range go; returns the bytes freed."""
        unit = self.discard_unit
        start = -(-offset // unit) * unit
        end = min((offset + length) // unit * unit, self.size)
        if end <= start:
            return 0
        # A memfd's pages live in the file: MADV_REMOVE punches the hole there (as
        # FALLOC_FL_PUNCH_HOLE would) and unmaps them. Private memory just drops its pages.
        advice = mmap.MADV_REMOVE if self.fd >= 0 else mmap.MADV_DONTNEED
        self.mmap.madvise(advice, start, end - start)
        return end - start

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for words in self.words:
            words.release()
        self.view.release()
        self._anchor = None  # (its export of the mapping would keep mmap.close() from closing it)
        self.mmap.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@mypyc_attr(allow_interpreted_subclasses=True)  # (tests watch its writes from a subclass)
class GuestMemory:
    """All guest RAM. Reads and writes are checked against the regions; nothing spans a hole."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        self.regions = sorted(regions, key=lambda r: r.guest_base)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.guest_end > b.guest_base:
                raise GuestMemoryError(f"RAM regions overlap at {b.guest_base:#x}")
        self._spans = [(int(r.guest_base), int(r.guest_base) + r.size, r.view, r.words) for r in self.regions]
        # Called with the runs (address, length) a device wrote guest RAM in behind the CPU's
        # back (virtio DMA), all of a completion at once: the software CPU must drop code it
        # translated from those bytes.
        self.on_device_writes: Callable[[list[tuple[int, int]]], None] | None = None
        # Set where RAM is loaded lazily (pages filled in on first touch, e.g. through
        # userfaultfd): makes every page present, for readers that skip the memfd's holes.
        self.populator: Callable[[], None] | None = None
        # Released with the memory, before its regions are unmapped (what fills it lazily).
        self.on_close: list[Callable[[], None]] = []
        # The RAM the guest boots with, when some regions are device memory (a virtio-mem
        # region the guest plugs blocks of): what `size` reports. None: every region is RAM.
        self.ram_size: int | None = None

    @classmethod
    def from_specs(cls, specs: list[RegionSpec], backing: Backing = DEFAULT_BACKING) -> "GuestMemory":
        regions: list[MemoryRegion] = []
        try:
            for spec in specs:
                regions.append(MemoryRegion(spec.guest_base, spec.size, backing=backing))
        except BaseException:
            for region in regions:
                region.close()
            raise
        return cls(regions)

    def discard(self, address: int, length: int) -> int:
        """Return guest-physical [address, address+length) to the host (a balloon inflating,
        free pages reported). Code the software CPU translated from it is dropped, as after a
        device write. Parts outside RAM are ignored; returns the bytes freed."""
        freed = 0
        for base, end, _, _ in self._spans:
            low, high = max(address, base), min(address + length, end)
            if low < high:
                freed += self.region_for(low).discard(low - base, high - low)
        if freed and self.on_device_writes is not None:
            self.on_device_writes([(address, length)])
        return freed

    def advise(self, backing: Backing) -> None:
        """Apply `backing`'s advice (KSM, THP) to memory made another way (a snapshot's file)."""
        for region in self.regions:
            apply_advice(region.mmap, backing)

    @property
    def size(self) -> int:
        """The guest's RAM (its e820 map): the regions' sizes, less device memory (ram_size)."""
        return self.ram_size if self.ram_size is not None else sum(r.size for r in self.regions)

    def populate(self) -> None:
        """Make every page present: RAM loaded lazily finishes loading (a no-op otherwise)."""
        if self.populator is not None:
            self.populator()

    def region_for(self, address: int, size: int = 1) -> MemoryRegion:
        for (base, end, _, _), region in zip(self._spans, self.regions):
            if base <= address and address + size <= end:
                return region
        raise _outside(address, size)

    def contains(self, address: int, size: int = 1) -> bool:
        for base, end, _, _ in self._spans:  # (a loop, not any() over a generator: every descriptor)
            if base <= address and address + size <= end:
                return True
        return False

    def locate(self, address: int, size: int) -> tuple[memoryview, int]:
        """(the region's view, offset of `address` in it) for an access inside one region: for
        struct's unpack_from without a slice. Plain ints on purpose: this is on every device
        and page-walk access."""
        for base, end, view, _ in self._spans:
            if base <= address and address + size <= end:
                return view, int(address) - base
        raise _outside(address, size)

    def view(self, address: int, size: int) -> memoryview:
        """A writable zero-copy view of [address, address+size), which must lie in one region."""
        if size < 0:
            raise GuestMemoryError(f"negative access size {size}")
        view, start = self.locate(address, max(size, 1))
        return view[start:start + size]

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.view(address, size))

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        self.view(address, len(data))[:] = data

    def load(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `address` as a loader fills RAM before the guest runs (a kernel, an
        initrd): through the region's memfd with pwrite(2) where it has one, which copies into
        the file's pages without taking a page fault on each (faster for a 46 MiB vmlinux);
        through the mapping where RAM is not a plain memfd (anonymous or a private file
        copy, hugetlbfs, which has no write(2)) or is filled lazily (a userfaultfd restore: a
        partial page written to the file would hide the rest of the page's saved bytes)."""
        region = self.region_for(address, max(len(data), 1))
        if region.fd < 0 or region.backing.hugetlb or self.populator is not None or len(data) < _LOAD_BY_PWRITE:
            self.write(address, data)
            return
        rest = memoryview(data).cast("B")
        offset = address - int(region.guest_base)
        try:
            while rest:
                written = os.pwrite(region.fd, rest, offset)
                if written <= 0:
                    break
                rest, offset = rest[written:], offset + written
        except OSError:
            pass
        if rest:  # the mapping takes what the file would not
            self.write(int(region.guest_base) + offset, rest)

    def fill(self, address: int, size: int, byte: int = 0) -> None:
        self.view(address, size)[:] = bytes([byte]) * size

    def read_u8(self, address: int) -> int:
        view, start = self.locate(address, 1)
        return view[start]

    def read_u16(self, address: int) -> int:
        return self._load(address, 2, 0)

    def read_u32(self, address: int) -> int:
        return self._load(address, 4, 1)

    def read_u64(self, address: int) -> int:
        return self._load(address, 8, 2)

    def _load(self, address: int, size: int, kind: int) -> int:
        # (as _store: an aligned value is one load from a word view, else bytes)
        for base, end, view, words in self._spans:
            if base <= address and address + size <= end:
                offset = int(address) - base
                if offset % size == 0 and _LITTLE_ENDIAN:
                    return int(words[kind][offset // size])
                return int.from_bytes(view[offset:offset + size], "little")
        raise _outside(address, size)

    def write_u8(self, address: int, value: int) -> None:
        view, start = self.locate(address, 1)
        view[start] = value

    # The guest reads rings while devices write them (virtio's used index, from the I/O thread,
    # while the vCPU runs without the GIL): a value must go to RAM in one store. struct's
    # pack_into zeroes its destination before it packs, so a racing reader saw 0 there: a used
    # index of 0 sent Linux on to a used entry not yet written (the tools_io hang).

    def write_u16(self, address: int, value: int) -> None:
        self._store(address, 2, 0, value)

    def write_u32(self, address: int, value: int) -> None:
        self._store(address, 4, 1, value)

    def write_u64(self, address: int, value: int) -> None:
        self._store(address, 8, 2, value)

    def _store(self, address: int, size: int, kind: int, value: int) -> None:
        # (the search of locate, which returns no word views: reads stay one call deep)
        for base, end, view, words in self._spans:
            if base <= address and address + size <= end:
                offset = int(address) - base
                if offset % size == 0 and _LITTLE_ENDIAN:
                    words[kind][offset // size] = value  # one aligned store (memoryview packs with a fixed-size copy)
                else:
                    view[offset:offset + size] = value.to_bytes(size, "little")  # a copy, never zeroed first
                return
        raise _outside(address, size)

    def read_cstring(self, address: int, limit: int = 4096) -> bytes:
        region = self.region_for(address)
        end = min(address + limit, region.guest_end)
        data = self.view(address, end - address).tobytes()
        nul = data.find(b"\0")
        return data if nul < 0 else data[:nul]

    def close(self) -> None:
        while self.on_close:
            self.on_close.pop()()
        for region in self.regions:
            region.close()

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
