"""The transports' register files, as a guest reaches them: virtio-mmio's registers and config
window, and a virtio-pci function through the PCI root (ECAM config space, conf1 ports, its BARs
once mapped: common config, notify, ISR, device config, the MSI-X table and PBA). The device
behind them is a virtio-rng, its queues in guest RAM the input also fills. Any access the guest
makes must be answered (or ignored), never raise."""

from __future__ import annotations

from pyvmm.arch.x86_64 import layout
from pyvmm.bus import MmioBus, PioBus
from pyvmm.devices.virtio.mmio import VirtioMmioTransport
from pyvmm.devices.virtio.pci import VirtioPciTransport
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.pci import PciRoot

from .guest import RAM, fill, memory
from .reader import Reader

SIZES = (1, 2, 4, 8, 3, 0, 16)


class Line:
    level = False

    def set_level(self, high: bool) -> None:
        self.level = high

    def trigger(self) -> None:
        pass


class MsiVector:
    eventfd = -1

    def configure(self, address: int, data: int, masked: bool) -> None:
        pass

    def trigger(self) -> None:
        pass

    def close(self) -> None:
        pass


def mmio_input(data: bytes) -> None:
    r = Reader(data)
    ops = r.take(r.u8() * 4)
    fill(memory(), r)
    transport = VirtioMmioTransport(VirtioRng(source=lambda n: bytes(n)), Line(), memory())
    transport.on_notify = transport.device.notify
    ops_reader = Reader(ops)
    while ops_reader.left:
        kind, offset, size = ops_reader.u8(), ops_reader.u16() % 0x200, ops_reader.choice(SIZES)
        if kind & 1:
            transport.read(offset, size)
        else:
            # often a plausible value (an address in RAM, a small count), sometimes anything
            value = ops_reader.below(RAM) if kind & 2 else ops_reader.u64()
            transport.write(offset, value.to_bytes(8, "little")[:size])
    transport.save()


ECAM = layout.PCI_ECAM_BASE
MMIO32 = (layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE)
MMIO64 = (0x1_0000_0000, 64 << 30)


def pci_input(data: bytes) -> None:
    r = Reader(data)
    ops = r.take(r.u8() * 4)
    fill(memory(), r)
    pio, mmio = PioBus(), MmioBus()
    root = PciRoot(pio, mmio, ecam_base=ECAM, mmio32_window=MMIO32, mmio64_window=MMIO64,
                   irq_line=lambda gsi: Line())
    transport = VirtioPciTransport(VirtioRng(source=lambda n: bytes(n)), memory(), msi_vector=MsiVector)
    slot = root.add_device(transport, name="rng0")
    transport.on_notify = transport.device.notify
    config = ECAM + (slot << 15)
    # firmware's part: BARs placed in the windows, memory decode on
    for bar, address in ((1, MMIO32[0]), (4, MMIO64[0])):
        offset = 0x10 + 4 * bar
        mmio.write(config + offset, address.to_bytes(8 if bar == 4 else 4, "little")[:4])
        if bar == 4:
            mmio.write(config + offset + 4, (address >> 32).to_bytes(4, "little"))
    mmio.write(config + 4, (0x6).to_bytes(2, "little"))
    ops_reader = Reader(ops)
    while ops_reader.left:
        kind, size = ops_reader.u8(), ops_reader.choice(SIZES)
        value = (ops_reader.below(RAM) if kind & 8 else ops_reader.u64()).to_bytes(8, "little")[:size]
        target = kind >> 4
        if target < 8:     # its configuration space through ECAM
            address = config + ops_reader.u16() % 4096
        elif target < 10:  # conf1: the address latch and data ports
            address = None
            port = 0xCF8 if target == 8 else 0xCFC + ops_reader.u8() % 4
            if kind & 1:
                pio.read(port, size)
            else:
                pio.write(port, value)
            continue
        else:              # the BARs where they are now (the input may have moved or disabled them)
            bar = (1, 4)[target & 1]
            base = transport.bar_address(bar)
            address = (base if base is not None else MMIO32[0]) + ops_reader.u16() % 0x4000
        if kind & 1:
            mmio.read(address, size)
        else:
            mmio.write(address, value)
    transport.save()
