"""Buses map guest address ranges to devices; they know nothing about what sits on them.

A device sees only offsets into its own range: `read(offset, size) -> bytes` and
`write(offset, data)`. Accesses no device claims read as all-ones (what an empty ISA
or PCI bus returns) and are logged once per address, not per access, so a guest
probing hardware that is not there does not flood the log.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

from ..errors import UserError

log = logging.getLogger(__name__)

# Addresses whose handlers a bus remembers (writer()/reader()); past that the table starts over,
# so a guest probing every address of a window cannot grow it without bound.
CACHED_ADDRESSES = 4096


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusConflict(UserError, ValueError):
    """A range overlaps one already registered, or is empty / out of the bus."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Sorted, non-overlapping ranges. Lookups are lock-free; registration copies on write."""

    kind = "bus"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ranges: tuple[BusRange, ...] = ()
        self._bases: tuple[int, ...] = ()
        self._lock = threading.Lock()
        self._warned: set[int] = set()
        self.unclaimed_accesses = 0
        self._forget_handlers()

    def _forget_handlers(self) -> None:
        # The handlers writer() and reader() made, by address: a hot caller looks up here first
        # and calls writer()/reader() on a miss, reading the attribute for each access. New
        # tables, never cleared in place, after the ranges changed: a lookup that raced a
        # (un)registration filled the old table, which nobody reads again.
        self.writers: dict[int, Callable[[bytes], None]] = {}
        self.readers: dict[int, Callable[[int], bytes]] = {}

    def register(self, base: int, length: int, device: BusDevice, name: str | None = None) -> BusRange:
        name = name or type(device).__name__
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusConflict(f"{self.kind}: {name} range {base:#x}+{length:#x} is empty or outside the bus")
        new = BusRange(base, length, device, name)
        with self._lock:
            for r in self._ranges:
                if base < r.end and r.base < new.end:
                    raise BusConflict(
                        f"{self.kind}: {name} at {base:#x}-{new.end - 1:#x} overlaps {r.name} at {r.base:#x}-{r.end - 1:#x}"
                    )
            ranges = sorted(self._ranges + (new,), key=lambda r: r.base)
            self._ranges, self._bases = tuple(ranges), tuple(r.base for r in ranges)
            self._forget_handlers()
        return new

    def unregister(self, base: int) -> BusDevice:
        with self._lock:
            for r in self._ranges:
                if r.base == base:
                    ranges = tuple(x for x in self._ranges if x is not r)
                    self._ranges, self._bases = ranges, tuple(x.base for x in ranges)
                    self._forget_handlers()
                    return r.device
        raise KeyError(f"{self.kind}: nothing registered at {base:#x}")

    def find(self, address: int) -> BusRange | None:
        ranges, bases = self._ranges, self._bases
        i = bisect.bisect_right(bases, address) - 1
        if i >= 0:
            r = ranges[i]
            if address < r.base + r.length:
                return r
        return None

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        return self._ranges

    def read(self, address: int, size: int) -> bytes:
        r = self.find(address)
        if r is None:
            self._unclaimed("read", address, size)
            return b"\xff" * size
        return r.device.read(address - r.base, size)

    def write(self, address: int, data: bytes) -> None:
        r = self.find(address)
        if r is None:
            self._unclaimed("write", address, len(data))
            return
        r.device.write(address - r.base, data)

    # --- per-address handlers: for the KVM run loop, one dict lookup and one call per exit ------

    def writer(self, address: int) -> Callable[[bytes], None]:
        """What write(address, data) does, as a callable taking `data` (the device's write bound
        to its offset). Remembered per address until the ranges change."""
        writers = self.writers
        found = writers.get(address)
        if found is None:
            r = self.find(address)
            found = partial(self._unclaimed_write, address) if r is None else partial(r.device.write, address - r.base)
            if len(writers) >= CACHED_ADDRESSES:
                writers.clear()
            writers[address] = found
        return found

    def reader(self, address: int) -> Callable[[int], bytes]:
        """What read(address, size) does, as a callable taking `size`."""
        readers = self.readers
        found = readers.get(address)
        if found is None:
            r = self.find(address)
            found = partial(self._unclaimed_read, address) if r is None else partial(r.device.read, address - r.base)
            if len(readers) >= CACHED_ADDRESSES:
                readers.clear()
            readers[address] = found
        return found

    def _unclaimed_write(self, address: int, data: bytes) -> None:
        self._unclaimed("write", address, len(data))

    def _unclaimed_read(self, address: int, size: int) -> bytes:
        self._unclaimed("read", address, size)
        return b"\xff" * size

    def _unclaimed(self, what: str, address: int, size: int) -> None:
        self.unclaimed_accesses += 1
        if address not in self._warned:
            self._warned.add(address)
            log.info("%s %s of %d byte(s) at %#x: no device there (reads return all-ones)", self.kind, what, size, address)


class PioBus(Bus):
    """Ports are few and hot (a UART is polled once per byte): remember each port's range."""

    kind = "port I/O"

    def __init__(self) -> None:
        super().__init__(1 << 16)
        self._port_cache: dict[int, BusRange | None] = {}

    def register(self, base: int, length: int, device: BusDevice, name: str | None = None) -> BusRange:
        added = super().register(base, length, device, name)
        self._port_cache = {}
        return added

    def unregister(self, base: int) -> BusDevice:
        removed = super().unregister(base)
        self._port_cache = {}
        return removed

    def find(self, address: int) -> BusRange | None:
        cache = self._port_cache
        try:
            return cache[address]
        except KeyError:
            found = cache[address] = super().find(address)
            return found


class MmioBus(Bus):
    kind = "MMIO"

    def __init__(self) -> None:
        super().__init__(1 << 64)


class Window:
    """Part of a device seen at another base: lets one device answer at scattered ports
    (the i8042 at 0x60 and 0x64, with 0x61 left to the PIT's speaker port)."""

    def __init__(self, device: BusDevice, offset: int) -> None:
        self.device, self.offset = device, offset

    def read(self, offset: int, size: int) -> bytes:
        return self.device.read(self.offset + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.device.write(self.offset + offset, data)
