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
from typing import Protocol

from ..errors import UserError

log = logging.getLogger(__name__)


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
        return new

    def unregister(self, base: int) -> BusDevice:
        with self._lock:
            for r in self._ranges:
                if r.base == base:
                    ranges = tuple(x for x in self._ranges if x is not r)
                    self._ranges, self._bases = ranges, tuple(x.base for x in ranges)
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
