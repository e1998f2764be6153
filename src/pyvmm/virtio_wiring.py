"""Put virtio devices on their transports and wire kicks and interrupts to the accelerator.

One device model, two wirings:

- KVM: each queue's kick register is an ioeventfd, so a guest kick costs no exit to
  Python on the vCPU thread; the I/O thread wakes on the eventfd and serves the queue.
- software CPU: the kick is an MMIO write that reaches the transport, which hands it to
  the same I/O thread, so completions arrive asynchronously, as on KVM; a disk's or a NIC's
  kick is served in place when that is quicker (inline_kicks.py).

The device manager allocates each device's virtio-mmio slot (window and GSI) or PCI slot
and records it in the device tree with the device and its transport. The guest learns about
virtio-mmio devices from the DSDT (`acpi_items`), about virtio-pci devices by scanning the
PCI bus.
"""

from __future__ import annotations

import functools
import logging

from .arch.x86_64.acpi import virtio_mmio_device
from .config import ConfigError
from .devices.virtio.mmio import MMIO_WINDOW, VirtioMmioTransport
from .devmgr import DeviceManager, Request
from .inline_kicks import InlineKicks

log = logging.getLogger(__name__)


class VirtioWiring:
    def __init__(self, accel, memory, mmio_bus, iothread, manager: DeviceManager, pci_root=None,
                 pci_root_id: str | None = None) -> None:
        self.accel, self.memory, self.iothread = accel, memory, iothread
        self.mmio_bus, self.manager = mmio_bus, manager
        self.pci_root, self.pci_root_id = pci_root, pci_root_id
        self.acpi_items: list = []
        self._ioeventfds: list[tuple[int, int, int, int]] = []  # (fd, address, length, datamatch)

    def add(self, name: str, kind: str, device, transport: str):
        """Put `device` (node id `name`, kind `kind`) on a transport: "mmio" or "pci"."""
        if transport == "mmio":
            added = self._add_mmio(name, kind, device)
        elif transport == "pci":
            added = self._add_pci(name, kind, device)
        else:
            raise ConfigError(f"{name}: unknown virtio transport {transport!r}")
        self.manager.attach(name, device, added)
        # Kicks that reach the transport (the software CPU, or KVM before an ioeventfd is in
        # place) go to the I/O thread, or are served where they were made (a disk's, on the
        # software CPU), with the interrupt held until the slice ends (inline_kicks.py).
        added.on_notify = InlineKicks(device, self.accel, self.iothread)
        return added

    def _add_mmio(self, name: str, kind: str, device) -> VirtioMmioTransport:
        node = self.manager.add(name, kind, Request(mmio_window=MMIO_WINDOW), transport="virtio-mmio")
        (base, _), = node.resources.mmio
        gsi, = node.resources.gsis
        index = node.resources.mmio_slot
        assert index is not None  # the manager gives a window request a slot
        transport = VirtioMmioTransport(device, self.accel.irq_line(gsi), self.memory)
        self.mmio_bus.register(base, MMIO_WINDOW, transport, name)
        for offset, length, value in transport.notify_offsets():
            self._kick_through_eventfd(device, base + offset, length, value)
        self.acpi_items.append(virtio_mmio_device(index, base, MMIO_WINDOW, gsi))
        log.debug("%s: virtio-mmio at %#x, GSI %d", name, base, gsi)
        return transport

    def _add_pci(self, name: str, kind: str, device):
        if self.pci_root is None:
            raise ConfigError(f"{name}: this machine has no PCI bus (use transport=mmio)")
        from .devices.virtio.pci import VirtioPciTransport

        node = self.manager.add(name, kind, Request(pci_slot=True), transport="virtio-pci", parent=self.pci_root_id)
        transport = VirtioPciTransport(device, self.memory, msi_vector=self.accel.msi_vector)
        slot = self.pci_root.add_device(transport, node.resources.pci_slot, name=name)
        transport.on_notify_moved = functools.partial(self._move_pci_kicks, device)
        log.debug("%s: virtio-pci in slot %d", name, slot)
        return transport

    def _move_pci_kicks(self, device, old_base: int | None, new_base: int | None, offsets) -> None:
        """The guest (re)programmed the BAR holding the notify registers: move their ioeventfds."""
        if old_base is not None:
            self._drop_kicks(old_base, offsets)
        if new_base is not None:
            for offset, length, value in offsets:
                self._kick_through_eventfd(device, new_base + offset, length, value)

    def _kick_through_eventfd(self, device, address: int, length: int, queue_index: int) -> None:
        # A vhost-user device's data plane is another process: KVM signals its kick fd directly.
        external = device.kick_eventfd(queue_index) if hasattr(device, "kick_eventfd") else None
        fd = self.accel.add_ioeventfd(address, length, datamatch=queue_index, eventfd=external)
        if fd is None:
            return  # the software CPU: the write reaches the transport
        self._ioeventfds.append((fd, address, length, queue_index))
        if external is None:
            self.iothread.add_eventfd(fd, functools.partial(device.notify, queue_index))

    def _drop_kicks(self, base: int, offsets) -> None:
        addresses = {base + offset for offset, _, _ in offsets}
        dropped = [entry for entry in self._ioeventfds if entry[1] in addresses]
        self._ioeventfds = [entry for entry in self._ioeventfds if entry[1] not in addresses]
        for fd, address, length, value in dropped:
            # on the I/O thread, in this order: the fd must not be closed while it is still polled
            self.iothread.remove_reader(fd)
            self.iothread.call_soon(functools.partial(
                self.accel.remove_ioeventfd, fd, address, length, datamatch=value))

    def close(self) -> None:
        """After the vCPUs and the I/O thread stopped; the accelerator closes its ioeventfds."""
        self._ioeventfds.clear()
