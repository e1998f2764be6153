"""The PCI root complex: one host bridge, bus 0, and the two ways to reach config space.

* Configuration mechanism #1 (PCI 3.0, 3.2.2.3.2): 0xCF8 holds a dword address
  (bit 31 enable, bus 23-16, device 15-11, function 10-8, register 7-2); 0xCFC-0xCFF are
  the data bytes of that dword, accessed as bytes, words or the whole dword. Only dword
  accesses at 0xCF8 reach the address register (Linux's conf1 probe writes a byte to 0xCFB).
* ECAM (PCIe 7.2.2): a 1 MiB MMIO window per bus, offset = bus << 20 | device << 15 |
  function << 12 | register. Only bus 0 exists.

Device 0 is the host bridge (Red Hat 1b36:0008, class 0x0600); devices plug into slots 1-31
as function 0 (single-function only). Absent slots and functions read all-ones.

BARs: `add_device` places each BAR, naturally aligned, the way firmware would: I/O BARs in
`io_window`, 32-bit memory BARs in `mmio32_window`, 64-bit ones in `mmio64_window` (in the
32-bit window when there is none), and turns on I/O / memory decode. The guest may move
them later; the device remaps itself on the buses (see device.py).

INTx: pin P (1-4 = INTA-INTD) of slot S raises GSI intx_gsis[(S + P - 1) % len(intx_gsis)]
-- the usual swizzle over the eight IOAPIC pins 16-23 by default, so devices that use only
INTA get a GSI each for slots 1-8. A GSI shared by several pins is their wired-OR. The
ACPI _PRT built from `intx_routes()` gives the same map; the lines are level-triggered
(Linux programs static _PRT GSIs level, active low; the IOAPIC models take the asserted
state whatever the polarity).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ..bus import IrqLine, MmioBus, NullIrqLine, PioBus
from ..persist import State, require
from .config import EXTENDED_SIZE, INTERRUPT_LINE, COMMAND, COMMAND_IO, COMMAND_MEMORY, BarKind, PciError
from .device import PciDevice
from .msix import MsiVectorFactory

log = logging.getLogger(__name__)

CONF1_ADDRESS_PORT = 0xCF8
CONF1_DATA_PORT = 0xCFC
CONF1_PORTS = 8
CONF1_ENABLE = 1 << 31
CONF1_ADDRESS_MASK = 0x80FFFFFC      # bits 30-24 and 1-0 are reserved: they read back as 0

ECAM_BUS_SIZE = 1 << 20
SLOTS = 32
FUNCTIONS = 8
HOST_BRIDGE_SLOT = 0
DEFAULT_INTX_GSIS = tuple(range(16, 24))

REDHAT_VENDOR_ID = 0x1B36
REDHAT_PCIE_HOST_BRIDGE = 0x0008
CLASS_HOST_BRIDGE = 0x060000


class PciHostBridge(PciDevice):
    """Device 0 on bus 0: no BARs, no interrupt."""

    def __init__(self) -> None:
        super().__init__(REDHAT_VENDOR_ID, REDHAT_PCIE_HOST_BRIDGE, CLASS_HOST_BRIDGE,
                         subsystem_vendor_id=0x1AF4, subsystem_id=0x1100, interrupt_pin=0,
                         name="pci-host-bridge")


class _SharedGsi:
    """The wired-OR of the INTx pins routed to one GSI."""

    def __init__(self, line: IrqLine) -> None:
        self.line = line
        self.asserted: set[int] = set()
        self.lock = threading.Lock()

    def set(self, source: int, high: bool) -> None:
        with self.lock:
            before = bool(self.asserted)
            if high:
                self.asserted.add(source)
            else:
                self.asserted.discard(source)
            if bool(self.asserted) != before:
                self.line.set_level(not before)


class PciIntxLine:
    """The IrqLine a device's INTx pin drives: one input of a shared GSI."""

    def __init__(self, shared: _SharedGsi, source: int, gsi: int) -> None:
        self._shared, self._source, self.gsi = shared, source, gsi

    def set_level(self, high: bool) -> None:
        self._shared.set(self._source, high)

    def trigger(self) -> None:
        self.set_level(True)
        self.set_level(False)

    def __repr__(self) -> str:
        return f"PciIntxLine(gsi={self.gsi}, slot={self._source})"


class _Window:
    """A bump allocator over [base, base + size) handing out naturally aligned blocks."""

    def __init__(self, name: str, base: int, size: int) -> None:
        if base < 0 or size <= 0:
            raise PciError(f"PCI {name} window {base:#x}+{size:#x} is empty")
        self.name, self.base, self.size, self.cursor = name, base, size, base

    def allocate(self, size: int) -> int:
        address = (self.cursor + size - 1) & -size
        if address + size > self.base + self.size:
            raise PciError(f"PCI {self.name} window {self.base:#x}-{self.base + self.size - 1:#x} "
                           f"has no room for a {size:#x}-byte BAR")
        self.cursor = address + size
        return address


class _Conf1Ports:
    """Ports 0xCF8-0xCFF on the PIO bus."""

    def __init__(self, root: "PciRoot") -> None:
        self.root = root

    def read(self, offset: int, size: int) -> bytes:
        return self.root._conf1_read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.root._conf1_write(offset, data)


class _EcamWindow:
    """The ECAM window on the MMIO bus."""

    def __init__(self, root: "PciRoot") -> None:
        self.root = root

    def read(self, offset: int, size: int) -> bytes:
        bus, slot, function, register = _ecam_decode(offset)
        return self.root.config_read(bus, slot, function, register, size)

    def write(self, offset: int, data: bytes) -> None:
        bus, slot, function, register = _ecam_decode(offset)
        self.root.config_write(bus, slot, function, register, data)


def _ecam_decode(offset: int) -> tuple[int, int, int, int]:
    return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF


class PciRoot:
    """Bus 0 of PCI segment `segment`, its host bridge, conf1 ports and ECAM window.

    `irq_line(gsi)` and `msi_vector()` are the accelerator's factories (`accel.irq_line`,
    `accel.msi_vector`); without them INTx goes nowhere and MSI-X vectors are not connected.
    Windows are (base, size) pairs.
    """

    def __init__(self, pio: PioBus, mmio: MmioBus, *, ecam_base: int,
                 mmio32_window: tuple[int, int], mmio64_window: tuple[int, int] | None = None,
                 io_window: tuple[int, int] = (0xC000, 0x4000),
                 irq_line: Callable[[int], IrqLine] | None = None,
                 msi_vector: MsiVectorFactory | None = None,
                 intx_gsis: tuple[int, ...] = DEFAULT_INTX_GSIS, segment: int = 0) -> None:
        if ecam_base % ECAM_BUS_SIZE:
            raise PciError(f"ECAM base {ecam_base:#x} must be 1 MiB aligned")
        if not intx_gsis:
            raise PciError("PCI INTx needs at least one GSI")
        if mmio32_window[0] + mmio32_window[1] > 1 << 32:
            raise PciError("the 32-bit PCI MMIO window must end below 4 GiB")
        if io_window[0] + io_window[1] > 1 << 16:
            raise PciError("the PCI I/O window must end below 0x10000")
        self.pio, self.mmio = pio, mmio
        self.segment = segment
        self.bus_range = (0, 0)
        self.ecam_base = ecam_base
        self.ecam_size = ECAM_BUS_SIZE * (self.bus_range[1] - self.bus_range[0] + 1)
        self.mmio32_window = tuple(mmio32_window)
        self.mmio64_window = tuple(mmio64_window) if mmio64_window is not None else None
        self.io_window = tuple(io_window)
        self.intx_gsis = tuple(intx_gsis)
        self._irq_line_factory = irq_line
        self._msi_vector = msi_vector
        self._windows = {
            "io": _Window("I/O", *io_window),
            "mem32": _Window("32-bit MMIO", *mmio32_window),
            "mem64": _Window("64-bit MMIO", *mmio64_window) if mmio64_window is not None else None,
        }
        self._gsis: dict[int, _SharedGsi] = {}
        self._devices: dict[int, PciDevice] = {}
        self._conf1_address = 0
        self._lock = threading.RLock()

        pio.register(CONF1_ADDRESS_PORT, CONF1_PORTS, _Conf1Ports(self), "pci-conf1")
        try:
            mmio.register(ecam_base, self.ecam_size, _EcamWindow(self), "pci-ecam")
        except Exception:
            pio.unregister(CONF1_ADDRESS_PORT)
            raise
        self.host_bridge = PciHostBridge()
        self.add_device(self.host_bridge, slot=HOST_BRIDGE_SLOT)

    # --- devices --------------------------------------------------------------------------------

    @property
    def devices(self) -> dict[int, PciDevice]:
        """Slot -> device, host bridge included."""
        return dict(self._devices)

    def device(self, slot: int) -> PciDevice | None:
        return self._devices.get(slot)

    def add_device(self, device: PciDevice, slot: int | None = None, *, name: str | None = None) -> int:
        """Plug `device` in as function 0 of `slot` (the first free one of 1-31 if None):
        place its BARs, enable decode, wire INTx and MSI-X (unless the device connected its
        vectors itself). `name` renames the device (bus range names, logs). Returns the slot."""
        if name is not None:
            device.name = name
        with self._lock:
            if slot is None:
                free = [s for s in range(1, SLOTS) if s not in self._devices]
                if not free:
                    raise PciError(f"no free PCI slot for {device.name} (bus 0 holds 31 devices)")
                slot = free[0]
            if not 0 <= slot < SLOTS or (slot == HOST_BRIDGE_SLOT and self._devices):
                raise PciError(f"PCI slot {slot} is not available for {device.name} (use 1-31)")
            if slot in self._devices:
                raise PciError(f"PCI slot {slot} already holds {self._devices[slot].name}")
            if device.attached:
                raise PciError(f"{device.name} is already plugged in")
            self._place_bars(device)

            intx = None
            pin = device.config.interrupt_pin
            if pin:
                gsi = self.intx_gsi(slot, pin)
                device.config.put(INTERRUPT_LINE, 1, gsi)      # what firmware would leave there
                intx = PciIntxLine(self._shared_gsi(gsi), slot, gsi)
            device.attach(pio=self.pio, mmio=self.mmio, intx=intx, msi_vector=self._msi_vector)
            self._devices[slot] = device
            log.debug("PCI 00:%02x.0 %s (%04x:%04x)", slot, device.name, device.config.vendor_id,
                      device.config.device_id)
            return slot

    def remove_device(self, slot: int) -> PciDevice:
        """Unplug the device in `slot` (hotplug): its BARs leave the buses, its INTx pin drops,
        its MSI-X vectors are released; the slot reads all-ones again."""
        with self._lock:
            device = self._devices.get(slot)
            if device is None or slot == HOST_BRIDGE_SLOT:
                raise PciError(f"PCI slot {slot} holds no device that can be unplugged")
            device.unmap_bars()
            device.set_intx(False)
            if device.msix is not None:
                device.msix.close()
            del self._devices[slot]
            log.debug("PCI 00:%02x.0 %s unplugged", slot, device.name)
            return device

    def _place_bars(self, device: PciDevice) -> None:
        windows = {k: w for k, w in self._windows.items() if w is not None}  # mem64 may be absent
        cursors = {k: w.cursor for k, w in windows.items()}
        try:
            command = 0
            for bar in sorted(device.config.bars.values(), key=lambda b: -b.size):  # big first: less padding
                if bar.kind is BarKind.IO:
                    window = windows["io"]
                    command |= COMMAND_IO
                elif bar.kind is BarKind.MEM64 and "mem64" in windows:
                    window = windows["mem64"]
                    command |= COMMAND_MEMORY
                else:
                    window = windows["mem32"]
                    command |= COMMAND_MEMORY
                device.config.set_bar_address(bar.index, window.allocate(bar.size))
        except PciError:
            for k, cursor in cursors.items():
                windows[k].cursor = cursor
            raise
        device.config.put(COMMAND, 2, device.config.command | command)

    def _shared_gsi(self, gsi: int) -> _SharedGsi:
        if gsi not in self._gsis:
            line = self._irq_line_factory(gsi) if self._irq_line_factory is not None else NullIrqLine()
            self._gsis[gsi] = _SharedGsi(line)
        return self._gsis[gsi]

    def intx_gsi(self, slot: int, pin: int) -> int:
        """The GSI of INTx pin `pin` (1-4 = INTA-INTD) of device `slot`."""
        if not 1 <= pin <= 4:
            raise PciError(f"INTx pin must be 1-4, got {pin}")
        return self.intx_gsis[(slot + pin - 1) % len(self.intx_gsis)]

    def intx_routes(self) -> list[tuple[int, int, int]]:
        """(slot, pin 0-3 = INTA-INTD, GSI) for every device slot 1-31: the _PRT's entries."""
        return [(slot, pin, self.intx_gsi(slot, pin + 1)) for slot in range(1, SLOTS) for pin in range(4)]

    # --- configuration space access ---------------------------------------------------------------

    def _function(self, bus: int, slot: int, function: int) -> PciDevice | None:
        if bus != self.bus_range[0] or function != 0:
            return None
        return self._devices.get(slot)

    def config_read(self, bus: int, slot: int, function: int, offset: int, size: int) -> bytes:
        """A guest config read; all-ones where nothing answers."""
        device = self._function(bus, slot, function)
        if device is None or size < 1 or offset < 0 or offset + size > EXTENDED_SIZE:
            return b"\xff" * size
        with self._lock:
            return device.config_read(offset, size)

    def config_write(self, bus: int, slot: int, function: int, offset: int, data: bytes) -> None:
        device = self._function(bus, slot, function)
        if device is None or not data or offset < 0 or offset + len(data) > EXTENDED_SIZE:
            return
        with self._lock:
            device.config_write(offset, bytes(data))

    @property
    def conf1_address(self) -> int:
        return self._conf1_address

    def _conf1_target(self, offset: int, size: int) -> tuple[int, int, int, int] | None:
        """(bus, slot, function, register) for a data-port access at 0xCFC + offset - 4."""
        address = self._conf1_address
        byte = offset - 4
        if not address & CONF1_ENABLE or byte + size > 4:
            return None
        return (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7, (address & 0xFC) + byte

    def _conf1_read(self, offset: int, size: int) -> bytes:
        if offset < 4:
            if offset == 0 and size == 4:
                return self._conf1_address.to_bytes(4, "little")
            return b"\xff" * size
        with self._lock:
            target = self._conf1_target(offset, size)
            if target is None:
                return b"\xff" * size
            return self.config_read(*target[:3], target[3], size)

    def _conf1_write(self, offset: int, data: bytes) -> None:
        if offset < 4:
            if offset == 0 and len(data) == 4:
                self._conf1_address = int.from_bytes(data, "little") & CONF1_ADDRESS_MASK
            return
        with self._lock:
            target = self._conf1_target(offset, len(data))
            if target is not None:
                self.config_write(*target[:3], target[3], data)

    def close(self) -> None:
        """Take the root and its devices off the buses and release their MSI vectors."""
        with self._lock:
            for device in self._devices.values():
                device.unmap_bars()
                if device.msix is not None:
                    device.msix.close()
            for bus, base in ((self.pio, CONF1_ADDRESS_PORT), (self.mmio, self.ecam_base)):
                try:
                    bus.unregister(base)
                except KeyError:
                    pass

    # --- snapshots ----------------------------------------------------------------------------------

    def save(self) -> PciRootState:
        with self._lock:
            return PciRootState(conf1_address=self._conf1_address,
                                devices={slot: device.save() for slot, device in sorted(self._devices.items())})

    def check_restorable(self, state: PciRootState) -> None:
        state = require(state, PciRootState)
        if sorted(state.devices) != sorted(self._devices):
            state.fail("devices", f"in slots {sorted(state.devices)}, this root has {sorted(self._devices)}")
        for slot, device in self._devices.items():
            device.check_restorable(state.devices[slot])

    def restore(self, state: PciRootState) -> None:
        """Load a save() into a root holding the same devices in the same slots: every device's
        state is checked before any is changed."""
        self.check_restorable(state)
        with self._lock:
            self._conf1_address = state.conf1_address
            for device in self._devices.values():    # so no BAR finds another's old place taken
                device.unmap_bars()
            for slot, device in self._devices.items():
                device.restore(state.devices[slot])


@dataclass(frozen=True)
class PciRootState(State):
    """The CONF1 address latch and each slot's function (a PciDeviceState or a transport's state)."""
    KIND = "pci_root"
    conf1_address: int
    devices: dict[int, State]

    def validate(self) -> None:
        self.check_mask("conf1_address", CONF1_ADDRESS_MASK)
        for slot in self.devices:
            if not 0 <= slot < SLOTS:
                self.fail("devices", f"slot {slot} is outside 0..{SLOTS - 1}")
