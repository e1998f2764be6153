"""PciDevice: one PCI function -- configuration space, BAR regions on the buses, INTx, MSI-X.

A device model (a virtio-pci transport, say) subclasses or wraps this:

* before it is plugged into a root: declare BARs (`add_bar`), capabilities
  (`add_capability`, `add_vendor_capability`) and MSI-X (`add_msix`, table and PBA in one
  of its memory BARs);
* override `bar_read(index, offset, size)` / `bar_write(index, offset, data)` to serve its
  BARs (offsets are within the BAR; MSI-X table/PBA accesses never reach them);
* override `config_read` / `config_write` (calling super) to watch config accesses;
* override `on_bar_remap(index, old, new)` or append to `bar_remap_listeners` to follow
  BAR moves (KVM ioeventfds on a notify region);
* raise interrupts with `set_intx(asserted)` or `msix.notify(vector)`.

The root assigns the initial BAR addresses and then maps each BAR on the PIO/MMIO bus
whenever its address or the command register's decode bits say it should be: while the
guest sizes or moves a BAR (decode off, all-ones written, half of a 64-bit BAR written) the
region is unmapped, and it is mapped again at the new address.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ..bus import BusConflict, IrqLine, NullIrqLine
from ..persist import State, require
from .config import (
    BAR0, BAR_COUNT, CAP_ID_VENDOR, COMMAND, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEMORY, INTA,
    STATUS_INTERRUPT, Bar, BarKind, PciConfigSpace, PciConfigState, PciError,
)
from .msix import MsixCapability, MsiVectorFactory
from .msix_state import MsixState

log = logging.getLogger(__name__)

IO_SPACE_END = 1 << 16

BarRemapListener = Callable[[int, "int | None", "int | None"], None]


class PciBarRegion:
    """What a bus sees of one BAR: accesses at offsets within the BAR."""

    __slots__ = ("device", "index")

    def __init__(self, device: "PciDevice", index: int) -> None:
        self.device, self.index = device, index

    def read(self, offset: int, size: int) -> bytes:
        return self.device._bar_access_read(self.index, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.device._bar_access_write(self.index, offset, data)


class PciDevice:
    """Function 0 of a single-function PCI device with a type-0 header."""

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor_id: int | None = None, subsystem_id: int = 0,
                 interrupt_pin: int = INTA, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.config = PciConfigSpace(vendor_id, device_id, class_code, revision=revision,
                                     subsystem_vendor_id=subsystem_vendor_id, subsystem_id=subsystem_id,
                                     interrupt_pin=interrupt_pin)
        self.msix: MsixCapability | None = None
        self.bar_remap_listeners: list[BarRemapListener] = []
        self._regions: dict[int, PciBarRegion] = {}
        self._mapped: dict[int, int] = {}
        self._pio = self._mmio = None
        self._intx: IrqLine = NullIrqLine()
        self._intx_asserted = False
        self._intx_level: bool | None = None
        self._lock = threading.RLock()

    # --- declaration (before the device is plugged in) --------------------------------------

    def _check_unplugged(self, what: str) -> None:
        if self._pio is not None:
            raise PciError(f"{self.name}: declare {what} before the device is plugged into a PCI root")

    def add_bar(self, index: int, size: int, kind: BarKind = BarKind.MEM32, *, prefetchable: bool = False) -> Bar:
        self._check_unplugged("BARs")
        bar = self.config.add_bar(index, size, kind, prefetchable=prefetchable)
        self._regions[index] = PciBarRegion(self, index)
        return bar

    def add_capability(self, cap_id: int, body: bytes, *, writable: bytes | None = None) -> int:
        """Append a capability: `body` follows its ID and next-pointer bytes. Returns its offset."""
        self._check_unplugged("capabilities")
        return self.config.add_capability(cap_id, body, writable=writable)

    def add_vendor_capability(self, payload: bytes, *, writable: bytes | None = None) -> int:
        """A vendor-specific capability (ID 0x09): ID, next, length, then `payload` (the length
        byte counts all of it, as virtio_pci_cap's cap_len does). Returns its offset."""
        length = 3 + len(payload)
        if length > 0xFF:
            raise PciError(f"vendor capability of {length} bytes is too long")
        mask = None if writable is None else b"\0" + bytes(writable)
        if writable is not None and len(writable) != len(payload):
            raise PciError("a capability's writable mask must be as long as its payload")
        return self.add_capability(CAP_ID_VENDOR, bytes([length]) + bytes(payload), writable=mask)

    def add_msix(self, vectors: int, *, bar: int, table_offset: int, pba_offset: int) -> MsixCapability:
        """An MSI-X capability whose table and PBA live in memory BAR `bar` (declared first)."""
        self._check_unplugged("MSI-X")
        if self.msix is not None:
            raise PciError(f"{self.name}: MSI-X is already declared")
        target = self.config.bars.get(bar)
        if target is None or target.is_io:
            raise PciError(f"{self.name}: MSI-X needs memory BAR {bar} to be declared first")
        msix = MsixCapability(self.config, vectors, bar=bar, table_offset=table_offset, pba_offset=pba_offset)
        if (table_offset + msix.table_size > target.size or pba_offset + msix.pba_size > target.size):
            raise PciError(f"{self.name}: MSI-X table or PBA does not fit in BAR {bar} ({target.size:#x} bytes)")
        self.msix = msix
        return msix

    # --- what subclasses override ------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        """A read at `offset` within BAR `index` (not the MSI-X table or PBA)."""
        return bytes(size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """A write at `offset` within BAR `index` (not the MSI-X table or PBA)."""

    def on_bar_remap(self, index: int, old_address: int | None, new_address: int | None) -> None:
        """BAR `index` moved on its bus; None means unmapped (decode off, or being sized)."""

    def config_read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        """A guest write: masks applied, then INTx, BAR mappings and MSI-X follow."""
        with self._lock:
            self.config.write(offset, data)
            end = offset + len(data)
            command = offset < COMMAND + 2 and COMMAND < end
            if command:
                self._drive_intx()
            if command or (offset < BAR0 + 4 * BAR_COUNT and BAR0 < end):
                self.update_bar_mappings()
            if self.msix is not None:
                self.msix.config_written(offset, len(data))

    # --- interrupts ---------------------------------------------------------------------------

    def set_intx(self, asserted: bool) -> None:
        """Assert or deassert the device's INTx pin; the status register's interrupt bit
        follows, the line only while the command register's INTx disable bit is clear."""
        with self._lock:
            self._intx_asserted = bool(asserted)
            self.config.set_status_bits(STATUS_INTERRUPT, self._intx_asserted)
            self._drive_intx()

    @property
    def intx_asserted(self) -> bool:
        return self._intx_asserted

    def _drive_intx(self) -> None:
        level = self._intx_asserted and not self.config.command & COMMAND_INTX_DISABLE
        if level != self._intx_level:
            self._intx_level = level
            self._intx.set_level(level)

    # --- plumbing the root uses ---------------------------------------------------------------

    def attach(self, *, pio, mmio, intx: IrqLine | None = None, msi_vector: MsiVectorFactory | None = None) -> None:
        """Connect to the buses and interrupt sources (PciRoot.add_device does this)."""
        with self._lock:
            if self._pio is not None:
                raise PciError(f"{self.name} is already plugged in")
            self._pio, self._mmio = pio, mmio
            self._intx = intx or NullIrqLine()
            self._intx_level = None
            if self.msix is not None and msi_vector is not None and not self.msix.msi_vectors:
                self.msix.connect(msi_vector)
            self._drive_intx()
            self.update_bar_mappings()

    @property
    def attached(self) -> bool:
        return self._pio is not None

    def bar_address(self, index: int) -> int | None:
        """Where BAR `index` is mapped now, or None."""
        return self._mapped.get(index)

    def _decoded_address(self, bar: Bar) -> int | None:
        """Where the BAR decodes, or None: decode bit off, address 0, or not a usable range
        (the all-ones value left by sizing ends at the top of the address space)."""
        command = self.config.command
        address = self.config.bar_register_value(bar.index)
        if bar.is_io:
            if not command & COMMAND_IO or address == 0 or address + bar.size > IO_SPACE_END:
                return None
            return address
        limit = 1 << (64 if bar.is_64bit else 32)
        if not command & COMMAND_MEMORY or address == 0 or address + bar.size >= limit:
            return None
        return address

    def update_bar_mappings(self) -> None:
        """Bring the bus mappings in line with the BARs and the command register."""
        if self._pio is None:
            return
        with self._lock:
            before = dict(self._mapped)
            wanted = {i: self._decoded_address(bar) for i, bar in self.config.bars.items()}
            for i, address in wanted.items():        # unmap first: BARs may swap places
                old = self._mapped.get(i)
                if old is not None and old != address:
                    self._bus(i).unregister(old)
                    del self._mapped[i]
            for i, address in wanted.items():
                if address is None or self._mapped.get(i) == address:
                    continue
                bar = self.config.bars[i]
                try:
                    self._bus(i).register(address, bar.size, self._regions[i], f"{self.name}-bar{i}")
                except BusConflict as exc:
                    log.warning("%s: BAR %d left unmapped: %s", self.name, i, exc)
                    continue
                self._mapped[i] = address
            for i in sorted(wanted):
                old, new = before.get(i), self._mapped.get(i)
                if old != new:
                    log.debug("%s: BAR %d %s -> %s", self.name, i, _fmt(old), _fmt(new))
                    self.on_bar_remap(i, old, new)
                    for listener in self.bar_remap_listeners:
                        listener(i, old, new)

    def _bus(self, index: int):
        return self._pio if self.config.bars[index].is_io else self._mmio

    def unmap_bars(self) -> None:
        """Take every BAR off its bus (the device is being unplugged)."""
        with self._lock:
            for i, old in sorted(self._mapped.items()):
                self._bus(i).unregister(old)
                del self._mapped[i]
                self.on_bar_remap(i, old, None)
                for listener in self.bar_remap_listeners:
                    listener(i, old, None)

    def _bar_access_read(self, index: int, offset: int, size: int) -> bytes:
        msix = self.msix
        if msix is not None and index == msix.bar:
            if msix.in_table(offset, size):
                return msix.table_read(offset - msix.table_offset, size)
            if msix.in_pba(offset, size):
                return msix.pba_read(offset - msix.pba_offset, size)
        return self.bar_read(index, offset, size)

    def _bar_access_write(self, index: int, offset: int, data: bytes) -> None:
        msix = self.msix
        if msix is not None and index == msix.bar:
            if msix.in_table(offset, len(data)):
                return msix.table_write(offset - msix.table_offset, data)
            if msix.in_pba(offset, len(data)):
                return msix.pba_write(offset - msix.pba_offset, data)
        self.bar_write(index, offset, data)

    # --- snapshots ------------------------------------------------------------------------------

    def save(self) -> State:
        return self.save_pci()

    def save_pci(self) -> PciDeviceState:
        with self._lock:
            return PciDeviceState(config=self.config.save(),
                                  msix=self.msix.save() if self.msix is not None else None,
                                  intx=self._intx_asserted)

    def check_restorable(self, state: State) -> None:
        self.check_pci(require(state, PciDeviceState))

    def check_pci(self, state: PciDeviceState) -> None:
        self.config.check_restorable(state.config)
        if (state.msix is None) != (self.msix is None):
            state.fail("msix", f"{self.name} {'has no' if self.msix is None else 'has an'} MSI-X capability")
        if self.msix is not None and state.msix is not None:
            self.msix.check_restorable(state.msix)

    def restore(self, state: State) -> None:
        self.check_restorable(state)
        assert isinstance(state, PciDeviceState)
        self.restore_pci(state)

    def restore_pci(self, state: PciDeviceState) -> None:
        """Load a state check_pci accepted into a device declared the same way; BARs are
        remapped and the interrupt line and MSI vectors driven to the restored state."""
        with self._lock:
            self.config.restore(state.config)
            if self.msix is not None and state.msix is not None:
                self.msix.restore(state.msix)
            self._intx_asserted = state.intx
            self._intx_level = None
            self._drive_intx()
            self.update_bar_mappings()


@dataclass(frozen=True)
class PciDeviceState(State):
    """A PCI function: its configuration space (BARs included), its MSI-X table and PBA, and
    whether it asserts INTx."""
    KIND = "pci_device"
    config: PciConfigState
    msix: MsixState | None
    intx: bool


def _fmt(address: int | None) -> str:
    return "unmapped" if address is None else f"{address:#x}"
