"""A type-0 PCI configuration space: 256 bytes of header and capabilities, 4 KiB with the
extended space ECAM reaches (PCI Local Bus 3.0, 6.1; PCIe 7.2.2).

Every byte has a guest-writable mask and a write-1-to-clear mask; everything else is read-only
to the guest. The device side (`get`/`put`) ignores the masks: that is how a device sets its
IDs, the interrupt-status bit or a capability's read-only fields.

BARs follow the usual sizing protocol through the masks alone: the low type bits are
read-only and the address bits below the BAR's size are hardwired to 0, so writing all-ones
reads back the size mask with the type bits.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from ..errors import PyvmmError
from ..persist import State, require

LEGACY_SIZE = 256
EXTENDED_SIZE = 4096

# Header registers (type 0).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09           # 3 bytes: programming interface, sub-class, base class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
BAR_COUNT = 6
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
EXPANSION_ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
CAPABILITIES_START = 0x40

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE

STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
# Master data parity error, signaled/received target abort, received master abort,
# signaled system error, detected parity error: the error bits software clears by writing 1.
STATUS_W1C = 0xF900

HEADER_TYPE_MULTIFUNCTION = 0x80

BAR_SPACE_IO = 1 << 0
BAR_MEM_TYPE_64 = 1 << 2
BAR_MEM_PREFETCH = 1 << 3
BAR_IO_FLAGS_MASK = 0x3
BAR_MEM_FLAGS_MASK = 0xF
IO_BAR_MAX = 256             # PCI 3.0, 6.2.5.1: an I/O BAR may not claim more than 256 bytes
MEM_BAR_MIN = 16

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX: Final = 0x11

INTERRUPT_PIN_NONE, INTA, INTB, INTC, INTD = 0, 1, 2, 3, 4


class PciError(PyvmmError, ValueError):
    """A device declaration the configuration space cannot hold (BAR, capability, ID)."""


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True)
class Bar:
    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def is_64bit(self) -> bool:
        return self.kind is BarKind.MEM64

    @property
    def offset(self) -> int:
        """Config-space offset of the BAR's (low) register."""
        return BAR0 + 4 * self.index

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.is_io:
            return BAR_SPACE_IO
        return (BAR_MEM_TYPE_64 if self.is_64bit else 0) | (BAR_MEM_PREFETCH if self.prefetchable else 0)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class PciConfigSpace:
    """The bytes of one function's configuration space with its access masks."""

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor_id: int | None = None, subsystem_id: int = 0, header_type: int = 0,
                 interrupt_pin: int = INTERRUPT_PIN_NONE) -> None:
        for value, bits, what in ((vendor_id, 16, "vendor ID"), (device_id, 16, "device ID"),
                                  (class_code, 24, "class code"), (revision, 8, "revision"),
                                  (subsystem_id, 16, "subsystem ID"), (header_type, 8, "header type")):
            if not 0 <= value < 1 << bits:
                raise PciError(f"PCI {what} {value:#x} does not fit in {bits} bits")
        if vendor_id == 0xFFFF:
            raise PciError("PCI vendor ID 0xffff means 'no device'")
        if interrupt_pin not in (INTERRUPT_PIN_NONE, INTA, INTB, INTC, INTD):
            raise PciError(f"PCI interrupt pin must be 0 (none) or 1-4 (INTA-INTD), got {interrupt_pin}")
        self._data = bytearray(EXTENDED_SIZE)
        self._wmask = bytearray(EXTENDED_SIZE)
        self._w1cmask = bytearray(EXTENDED_SIZE)
        self.bars: dict[int, Bar] = {}
        self._cap_end = CAPABILITIES_START
        self._caps: list[tuple[int, int]] = []

        self.put(VENDOR_ID, 2, vendor_id)
        self.put(DEVICE_ID, 2, device_id)
        self.put(REVISION_ID, 1, revision)
        self.put(CLASS_CODE, 3, class_code)
        self.put(HEADER_TYPE, 1, header_type)
        self.put(SUBSYSTEM_VENDOR_ID, 2, vendor_id if subsystem_vendor_id is None else subsystem_vendor_id)
        self.put(SUBSYSTEM_ID, 2, subsystem_id)
        self.put(INTERRUPT_PIN, 1, interrupt_pin)
        self.set_writable(COMMAND, 2, COMMAND_WRITABLE)
        self.set_w1c(STATUS, 2, STATUS_W1C)
        self.set_writable(CACHE_LINE_SIZE, 1, 0xFF)   # Linux writes it; it means nothing here
        self.set_writable(INTERRUPT_LINE, 1, 0xFF)    # scratch for the OS's IRQ number

    # --- device-side access (no masks) -------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        self._check(offset, size)
        return int.from_bytes(self._data[offset:offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        self._data[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def put_bytes(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self._data[offset:offset + len(data)] = data

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        """Make the bits of `mask` (a little-endian `size`-byte field) writable by the guest."""
        self._check(offset, size)
        raw = (mask & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self._wmask[offset:offset + size] = raw
        for i in range(size):
            self._w1cmask[offset + i] &= ~raw[i]

    def set_w1c(self, offset: int, size: int, mask: int) -> None:
        """Make the bits of `mask` write-1-to-clear for the guest."""
        self._check(offset, size)
        raw = (mask & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self._w1cmask[offset:offset + size] = raw
        for i in range(size):
            self._wmask[offset + i] &= ~raw[i]

    def _check(self, offset: int, size: int) -> None:
        if size < 1 or offset < 0 or offset + size > EXTENDED_SIZE:
            raise PciError(f"config space access {offset:#x}+{size} is outside 0-{EXTENDED_SIZE - 1:#x}")

    # --- guest access -----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes(self._data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """A guest write: writable bits take the new value, W1C bits written as 1 clear."""
        self._check(offset, len(data))
        d, w, c = self._data, self._wmask, self._w1cmask
        for i, byte in enumerate(data):
            j = offset + i
            d[j] = ((d[j] & ~w[j]) | (byte & w[j])) & ~(byte & c[j]) & 0xFF

    # --- common registers ---------------------------------------------------------------------

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    @property
    def status(self) -> int:
        return self.get(STATUS, 2)

    def set_status_bits(self, bits: int, on: bool) -> None:
        status = self.status
        self.put(STATUS, 2, status | bits if on else status & ~bits)

    @property
    def vendor_id(self) -> int:
        return self.get(VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.get(DEVICE_ID, 2)

    @property
    def class_code(self) -> int:
        return self.get(CLASS_CODE, 3)

    @property
    def interrupt_pin(self) -> int:
        return self.get(INTERRUPT_PIN, 1)

    # --- BARs ---------------------------------------------------------------------------------

    def add_bar(self, index: int, size: int, kind: BarKind = BarKind.MEM32, *, prefetchable: bool = False) -> Bar:
        if not 0 <= index < BAR_COUNT:
            raise PciError(f"BAR index {index} out of range 0-5")
        if kind is BarKind.MEM64 and index == BAR_COUNT - 1:
            raise PciError("a 64-bit BAR cannot start at BAR 5 (it takes two registers)")
        if not _is_power_of_two(size):
            raise PciError(f"BAR {index} size {size:#x} is not a power of two")
        if kind is BarKind.IO:
            if not 4 <= size <= IO_BAR_MAX:
                raise PciError(f"I/O BAR {index} size {size} must be 4-{IO_BAR_MAX} bytes")
            if prefetchable:
                raise PciError(f"I/O BAR {index} cannot be prefetchable")
        elif size < MEM_BAR_MIN or (kind is BarKind.MEM32 and size > 1 << 31) or size > 1 << 63:
            raise PciError(f"memory BAR {index} size {size:#x} out of range for {kind.value}")
        taken = {i for b in self.bars.values() for i in (b.index, b.index + 1 if b.is_64bit else b.index)}
        wanted = {index, index + 1} if kind is BarKind.MEM64 else {index}
        if taken & wanted:
            raise PciError(f"BAR register {min(taken & wanted)} is already in use")
        bar = Bar(index, size, kind, prefetchable)
        self.bars[index] = bar
        flags_mask = BAR_IO_FLAGS_MASK if bar.is_io else BAR_MEM_FLAGS_MASK
        size_mask = ~(size - 1) & ((1 << 64) - 1)
        self.put(bar.offset, 4, bar.flags)
        self.set_writable(bar.offset, 4, size_mask & 0xFFFFFFFF & ~flags_mask)
        if bar.is_64bit:
            self.put(bar.offset + 4, 4, 0)
            self.set_writable(bar.offset + 4, 4, size_mask >> 32)
        return bar

    def bar_register_value(self, index: int) -> int:
        """The BAR's address bits as programmed (both registers of a 64-bit BAR), flags masked off."""
        bar = self.bars[index]
        low = self.get(bar.offset, 4)
        if bar.is_io:
            return low & ~BAR_IO_FLAGS_MASK
        value = low & ~BAR_MEM_FLAGS_MASK
        if bar.is_64bit:
            value |= self.get(bar.offset + 4, 4) << 32
        return value

    def set_bar_address(self, index: int, address: int) -> None:
        """Program a BAR as firmware would (the flags stay)."""
        bar = self.bars[index]
        if address & (bar.size - 1):
            raise PciError(f"BAR {index} address {address:#x} is not aligned to its size {bar.size:#x}")
        limit = 1 << 64 if bar.is_64bit else 1 << 32
        if not 0 <= address <= limit - bar.size:
            raise PciError(f"BAR {index} address {address:#x} out of range for {bar.kind.value}")
        self.put(bar.offset, 4, (address & 0xFFFFFFFF) | bar.flags)
        if bar.is_64bit:
            self.put(bar.offset + 4, 4, address >> 32)

    # --- capabilities -------------------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, *, writable: bytes | None = None) -> int:
        """Append a capability (ID, next pointer, then `body`) to the list; returns its offset.

        `writable` is a byte mask the size of `body`: the bits the guest may change."""
        if not 0 < cap_id <= 0xFF:
            raise PciError(f"capability ID {cap_id:#x} out of range")
        if writable is not None and len(writable) != len(body):
            raise PciError("a capability's writable mask must be as long as its body")
        offset = self._cap_end
        end = offset + 2 + len(body)
        if end > LEGACY_SIZE:
            raise PciError(f"capability {cap_id:#x} of {2 + len(body)} bytes does not fit below 0x100")
        self.put(offset, 1, cap_id)
        self.put(offset + 1, 1, 0)
        self.put_bytes(offset + 2, bytes(body))
        if writable is not None:
            self._wmask[offset + 2:end] = writable
        if self._caps:
            self.put(self._caps[-1][1] + 1, 1, offset)
        else:
            self.put(CAPABILITIES_POINTER, 1, offset)
            self.set_status_bits(STATUS_CAP_LIST, True)
        self._caps.append((cap_id, offset))
        self._cap_end = (end + 3) & ~3    # capabilities start on dword boundaries
        return offset

    @property
    def capabilities(self) -> list[tuple[int, int]]:
        """(ID, offset) of each capability, in list order."""
        return list(self._caps)

    # --- snapshots ------------------------------------------------------------------------------

    def save(self) -> PciConfigState:
        return PciConfigState(data=bytes(self._data))

    def check_restorable(self, state: PciConfigState) -> None:
        """The masks are structural (rebuilt by the device's constructor), so the saved space
        must be the same function's: its IDs and class code are compared."""
        state = require(state, PciConfigState)
        data = state.data
        ids = struct.unpack_from("<HH", data, 0), data[CLASS_CODE:CLASS_CODE + 3]
        if ids != (struct.unpack_from("<HH", self._data, 0), bytes(self._data[CLASS_CODE:CLASS_CODE + 3])):
            state.fail("data", "belongs to another device (vendor, device ID or class differ)")

    def restore(self, state: PciConfigState) -> None:
        self.check_restorable(state)
        self._data[:] = state.data


@dataclass(frozen=True)
class PciConfigState(State):
    """The whole (extended) configuration space: header, BAR addresses, capabilities' registers."""
    KIND = "pci_config"
    data: bytes

    def validate(self) -> None:
        if len(self.data) != EXTENDED_SIZE:
            self.fail("data", f"{len(self.data)} bytes, expected {EXTENDED_SIZE}")
