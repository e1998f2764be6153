"""virtio-pci, modern only (virtio 1.2 section 4.1), in front of any VirtioDevice.

One PCI function per device: vendor 0x1AF4, device 0x1040 + the virtio device ID, revision 1
(non-transitional: no I/O BAR, no legacy register layout). Guests find it by scanning the
bus; the driver reads the vendor capabilities to locate the virtio structures, all in one
64-bit prefetchable memory BAR (QEMU's layout, one 4 KiB page per structure):

    BAR 4 + 0x0000  common configuration (struct virtio_pci_common_cfg)
          + 0x1000  ISR status (read to clear)
          + 0x2000  device-specific configuration
          + 0x3000  notifications: queue i at 0x3000 + 4 * i, so each queue has its own
                    address and a KVM ioeventfd needs no guess at which queue was kicked

MSI-X (num_queues + 1 vectors, table and PBA) lives in BAR 1, a 32-bit BAR of its own, so the
table never shares a page with the virtio registers. Without MSI-X the device raises INTx
(level) and sets ISR bits; reading the ISR clears them and drops the line.

The VIRTIO_PCI_CAP_PCI_CFG capability is a window onto the BARs through configuration space:
the driver points it at (bar, offset, length) and reads or writes its data field.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from ...pci.config import BarKind
from ...pci.device import PciDevice, PciDeviceState
from ...persist import State, require
from ...pci.msix import ENTRY_SIZE, MsiVectorFactory
from .device import (
    VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_ID_VSOCK, VirtioDevice,
)
from .transport import TransportCoreState, VirtioTransportCore

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_REVISION = 1
MAX_DEVICE_ID = 0x3F           # 0x1040 + id must stay in the virtio range 0x1040-0x107f

# Class codes as QEMU gives its virtio-*-pci devices.
CLASS_NETWORK_ETHERNET = 0x020000
CLASS_STORAGE_SCSI = 0x010000
CLASS_COMMUNICATION_OTHER = 0x078000
CLASS_OTHER = 0x00FF00
_CLASS_BY_DEVICE = {
    VIRTIO_ID_NET: CLASS_NETWORK_ETHERNET,
    VIRTIO_ID_BLOCK: CLASS_STORAGE_SCSI,
    VIRTIO_ID_CONSOLE: CLASS_COMMUNICATION_OTHER,
    VIRTIO_ID_VSOCK: CLASS_COMMUNICATION_OTHER,
}

# virtio_pci_cap.cfg_type
CAP_COMMON_CFG = 1
CAP_NOTIFY_CFG = 2
CAP_ISR_CFG = 3
CAP_DEVICE_CFG = 4
CAP_PCI_CFG = 5

# Field offsets within a virtio vendor capability (from its ID byte).
CAP_CFG_TYPE = 3
CAP_BAR = 4
CAP_ID = 5
CAP_OFFSET = 8
CAP_LENGTH = 12
CAP_NOTIFY_OFF_MULTIPLIER = 16     # notify capability only
CAP_PCI_CFG_DATA = 16              # PCI_CFG capability only

VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38   # without queue_notify_data / queue_reset
ISR_OFFSET, ISR_SIZE = 0x1000, 1
DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_REGION = 0x3000, 0x1000
NOTIFY_OFF_MULTIPLIER = 4
NOTIFY_WIDTH = 2                   # the driver writes the 16-bit queue index
MAX_QUEUES = NOTIFY_REGION // NOTIFY_OFF_MULTIPLIER

MSIX_BAR = 1
MSIX_TABLE_OFFSET = 0
MIN_MSIX_BAR_SIZE = 0x1000

NO_VECTOR = 0xFFFF                 # VIRTIO_MSI_NO_VECTOR
ISR_QUEUE = 1
ISR_CONFIG = 2

# struct virtio_pci_common_cfg
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30

_FIELD_WIDTH = {
    DEVICE_FEATURE_SELECT: 4, DEVICE_FEATURE: 4, DRIVER_FEATURE_SELECT: 4, DRIVER_FEATURE: 4,
    CONFIG_MSIX_VECTOR: 2, NUM_QUEUES: 2, DEVICE_STATUS: 1, CONFIG_GENERATION: 1,
    QUEUE_SELECT: 2, QUEUE_SIZE: 2, QUEUE_MSIX_VECTOR: 2, QUEUE_ENABLE: 2, QUEUE_NOTIFY_OFF: 2,
}
_QUEUE_ADDRESS = {QUEUE_DESC: "desc_table", QUEUE_DRIVER: "avail_ring", QUEUE_DEVICE: "used_ring"}

# (old BAR address, new BAR address, [(offset within the BAR, length, queue index)])
NotifyMovedCallback = Callable[["int | None", "int | None", "list[tuple[int, int, int]]"], None]


def class_code_for(device_id: int) -> int:
    return _CLASS_BY_DEVICE.get(device_id, CLASS_OTHER)


def _common_field(offset: int, size: int) -> tuple[int, int] | None:
    """(field, bit shift) a common-config access of `size` bytes at `offset` hits, or None
    when it is not a natural-width access to one field (64-bit fields take 8 or 4 + 4)."""
    if _FIELD_WIDTH.get(offset) == size:
        return offset, 0
    base = offset & ~7
    if base in _QUEUE_ADDRESS and (size == 8 and offset == base or size == 4 and offset % 4 == 0):
        return base, 8 * (offset - base)
    return None


def _vendor_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """A virtio_pci_cap payload (after ID, next and length): cfg_type, bar, id, padding, offset, length."""
    return struct.pack("<BBBxxII", cfg_type, bar, 0, offset, length) + extra


class VirtioPciTransport(PciDevice, VirtioTransportCore):
    """A modern virtio-pci function in front of `device`; plug it in with PciRoot.add_device."""

    def __init__(self, device: VirtioDevice, memory, *, msi_vector: MsiVectorFactory | None = None,
                 name: str | None = None) -> None:
        queues = len(device.queues)
        if not 0 <= device.device_id <= MAX_DEVICE_ID:
            raise ValueError(f"virtio device ID {device.device_id} has no modern PCI device ID")
        if queues > MAX_QUEUES:
            raise ValueError(f"{device.name}: {queues} queues, virtio-pci here serves at most {MAX_QUEUES}")
        pci_id = VIRTIO_PCI_DEVICE_ID_BASE + device.device_id
        # Spec 4.1.2.1: a non-transitional device's subsystem ID should be 0x40 or more.
        PciDevice.__init__(self, VIRTIO_PCI_VENDOR_ID, pci_id, class_code_for(device.device_id),
                           revision=VIRTIO_PCI_REVISION, subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
                           subsystem_id=pci_id, name=name or device.name)
        self._init_core(device)
        self._register_lock = threading.RLock()   # common-config accesses, never taken by interrupts
        self._isr = 0
        self._config_vector = NO_VECTOR
        self._queue_vectors = [NO_VECTOR] * queues
        self._on_notify_moved: NotifyMovedCallback | None = None

        vectors = queues + 1
        pba_offset = (MSIX_TABLE_OFFSET + vectors * ENTRY_SIZE + 0x7FF) & ~0x7FF
        msix_bar_size = MIN_MSIX_BAR_SIZE
        while msix_bar_size < pba_offset + (vectors + 63) // 64 * 8:
            msix_bar_size *= 2
        self.add_bar(MSIX_BAR, msix_bar_size, BarKind.MEM32)
        self.add_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, BarKind.MEM64, prefetchable=True)
        self.add_vendor_capability(_vendor_cap(CAP_COMMON_CFG, VIRTIO_BAR, COMMON_OFFSET, COMMON_SIZE))
        self.add_vendor_capability(_vendor_cap(CAP_NOTIFY_CFG, VIRTIO_BAR, NOTIFY_OFFSET,
                                               max(queues, 1) * NOTIFY_OFF_MULTIPLIER,
                                               struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        self.add_vendor_capability(_vendor_cap(CAP_ISR_CFG, VIRTIO_BAR, ISR_OFFSET, ISR_SIZE))
        self.add_vendor_capability(_vendor_cap(CAP_DEVICE_CFG, VIRTIO_BAR, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE))
        # The driver programs bar, offset and length, and reads or writes the data bytes.
        window_mask = bytes([0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        self._window_cap = self.add_vendor_capability(_vendor_cap(CAP_PCI_CFG, 0, 0, 0, bytes(4)),
                                                      writable=window_mask)
        # self.msix too, typed as always there: a virtio-pci function always has MSI-X
        self._msix = self.add_msix(vectors, bar=MSIX_BAR, table_offset=MSIX_TABLE_OFFSET, pba_offset=pba_offset)
        if msi_vector is not None:
            self._msix.connect(msi_vector)
        device.attach(memory, self)

    # --- VirtioInterrupt (called by the device, any thread) -------------------------------------

    def signal_used(self, queue_index: int) -> None:
        vectors = self._queue_vectors
        vector = vectors[queue_index] if 0 <= queue_index < len(vectors) else NO_VECTOR
        # (notify() reads the MSI-X control word itself: `enabled` is read again only when it
        # sent nothing, which a device completion rarely meets)
        if self._msix.notify(vector) or self._msix.enabled:
            return  # sent, held pending behind a mask, or MSI-X is on and the queue has no vector
        self._raise_isr(ISR_QUEUE)

    def signal_config(self) -> None:
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        msix = self._msix
        if msix.enabled:
            if self._config_vector != NO_VECTOR:
                msix.notify(self._config_vector)
            return
        self._raise_isr(ISR_CONFIG)

    def set_needs_reset(self) -> None:
        if self.mark_needs_reset():
            self.signal_config()

    def _raise_isr(self, bits: int) -> None:
        with self._lock:
            self._isr |= bits
            self._update_intx()

    def _update_intx(self) -> None:
        """INTx follows the ISR while MSI-X is off (a function using MSI-X must not use INTx)."""
        asserted = bool(self._isr) and not self._msix.enabled
        if asserted != self.intx_asserted:
            self.set_intx(asserted)

    @property
    def isr(self) -> int:
        return self._isr

    def queue_eventfd(self, queue_index: int) -> int | None:
        """The eventfd of the MSI-X vector queue `queue_index` signals (a KVM irqfd a vhost-user
        back-end can write as its call fd), or None: MSI-X off, no vector, or no such fd."""
        if not self._msix.enabled or not 0 <= queue_index < len(self._queue_vectors):
            return None
        vector = self._queue_vectors[queue_index]
        vectors = self._msix.msi_vectors
        if vector >= len(vectors):
            return None
        return getattr(vectors[vector], "eventfd", None)

    def queue_vector(self, queue_index: int) -> int:
        return self._queue_vectors[queue_index]

    @property
    def config_vector(self) -> int:
        return self._config_vector

    # --- where KVM can take the kicks without a VM exit -----------------------------------------

    def notify_offsets(self) -> list[tuple[int, int, int]]:
        """(offset within the BAR, length, queue index) of each queue's notify address."""
        return [(NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * index, NOTIFY_WIDTH, index)
                for index in range(len(self.device.queues))]

    @property
    def notify_bar(self) -> int:
        return VIRTIO_BAR

    @property
    def on_notify_moved(self) -> NotifyMovedCallback | None:
        """Called with (old base, new base, notify_offsets()) whenever the notify BAR is mapped,
        moved or unmapped (None for unmapped), and once on assignment if it is mapped already."""
        return self._on_notify_moved

    @on_notify_moved.setter
    def on_notify_moved(self, callback: NotifyMovedCallback | None) -> None:
        with self._lock:
            self._on_notify_moved = callback
            base = self.bar_address(VIRTIO_BAR)
            if callback is not None and base is not None:
                callback(None, base, self.notify_offsets())

    def on_bar_remap(self, index: int, old_address: int | None, new_address: int | None) -> None:
        if index == VIRTIO_BAR and self._on_notify_moved is not None:
            self._on_notify_moved(old_address, new_address, self.notify_offsets())

    # --- the virtio BAR -------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if index != VIRTIO_BAR:
            return bytes(size)
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            return self._common_read(offset - COMMON_OFFSET, size)
        if offset == ISR_OFFSET and size:  # (a zero-byte read must not clear it)
            with self._lock:
                isr, self._isr = self._isr, 0
                self._update_intx()
            return bytes([isr]) + bytes(size - 1)
        if DEVICE_CFG_OFFSET <= offset and offset + size <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            return self.device.read_config(offset - DEVICE_CFG_OFFSET, size)
        return bytes(size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != VIRTIO_BAR:
            return
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_REGION:
            queue, rest = divmod(offset - NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER)
            if rest == 0 and queue < len(self.device.queues):
                self.on_notify(queue)   # the address names the queue; the value is not needed
            else:
                log.debug("%s: notify write at %#x names no queue", self.name, offset)
        elif COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            self._common_write(offset - COMMON_OFFSET, data)
        elif DEVICE_CFG_OFFSET <= offset and offset + len(data) <= DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            self.device.write_config(offset - DEVICE_CFG_OFFSET, data)

    # --- common configuration -------------------------------------------------------------------

    def _common_read(self, offset: int, size: int) -> bytes:
        field = _common_field(offset, size)
        if field is None:
            log.debug("%s: %d-byte common config read at %#x ignored", self.name, size, offset)
            return bytes(size)
        with self._register_lock:
            value = self._read_field(field[0]) >> field[1]
        return (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def _read_field(self, field: int) -> int:
        queue = self.selected_queue()
        if field == DEVICE_FEATURE_SELECT:
            return self.device_features_sel
        if field == DEVICE_FEATURE:
            return self.device_features_word()
        if field == DRIVER_FEATURE_SELECT:
            return self.driver_features_sel
        if field == DRIVER_FEATURE:
            return self.driver_features_word()
        if field == CONFIG_MSIX_VECTOR:
            return self._config_vector
        if field == NUM_QUEUES:
            return len(self.device.queues)
        if field == DEVICE_STATUS:
            return self.status
        if field == CONFIG_GENERATION:
            return self.config_generation
        if field == QUEUE_SELECT:
            return self.queue_sel
        if queue is None:   # a queue that does not exist: size 0 tells the driver so
            return NO_VECTOR if field == QUEUE_MSIX_VECTOR else 0
        if field == QUEUE_SIZE:
            return queue.size
        if field == QUEUE_MSIX_VECTOR:
            return self._queue_vectors[self.queue_sel]
        if field == QUEUE_ENABLE:
            return int(queue.ready)
        if field == QUEUE_NOTIFY_OFF:
            return self.queue_sel    # times the multiplier: queue i kicks at NOTIFY_OFFSET + 4 * i
        return getattr(queue, _QUEUE_ADDRESS[field])

    def _common_write(self, offset: int, data: bytes) -> None:
        field = _common_field(offset, len(data))
        if field is None:
            log.debug("%s: %d-byte common config write at %#x ignored", self.name, len(data), offset)
            return
        with self._register_lock:
            self._write_field(field[0], field[1], len(data), int.from_bytes(data, "little"))

    def _write_field(self, field: int, shift: int, size: int, value: int) -> None:
        if field == DEVICE_FEATURE_SELECT:
            self.device_features_sel = value
        elif field == DRIVER_FEATURE_SELECT:
            self.driver_features_sel = value
        elif field == DRIVER_FEATURE:
            self.write_driver_features_word(value)
        elif field == CONFIG_MSIX_VECTOR:
            self._config_vector = self._checked_vector(value)
        elif field == DEVICE_STATUS:
            self.write_status(value)
        elif field == QUEUE_SELECT:
            self.queue_sel = value
        elif field == QUEUE_MSIX_VECTOR:
            if self.selected_queue() is not None:
                self._queue_vectors[self.queue_sel] = self._checked_vector(value)
        elif field in (QUEUE_SIZE, QUEUE_ENABLE) or field in _QUEUE_ADDRESS:
            self._write_queue_field(field, shift, size, value)
        # device_feature, num_queues, config_generation, queue_notify_off: read-only

    def _write_queue_field(self, field: int, shift: int, size: int, value: int) -> None:
        queue = self.queue_for_setup()
        if queue is None:
            return    # no such queue, or the driver is running: setup is frozen
        if field == QUEUE_SIZE:
            queue.size = value      # checked at DRIVER_OK
        elif field == QUEUE_ENABLE:
            if value == 1:
                queue.ready = True
            else:   # only a queue reset (not offered) may disable a queue
                log.debug("%s: queue_enable write of %d ignored", self.name, value)
        else:
            name = _QUEUE_ADDRESS[field]
            mask = ((1 << 8 * size) - 1) << shift
            setattr(queue, name, (getattr(queue, name) & ~mask) | (value << shift))

    def _checked_vector(self, vector: int) -> int:
        """What the driver reads back: the vector if the table has it, else NO_VECTOR."""
        return vector if 0 <= vector < self._msix.vectors else NO_VECTOR

    def reset(self) -> None:
        super().reset()
        self._config_vector = NO_VECTOR
        self._queue_vectors = [NO_VECTOR] * len(self.device.queues)
        with self._lock:
            self._isr = 0
            self._update_intx()

    # --- configuration space: MSI-X enable and the PCI_CFG window --------------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        if self._touches_window_data(offset, size):
            target = self._window_target()
            if target is not None:
                bar, bar_offset, length = target
                data = self._bar_access_read(bar, bar_offset, length)
                with self._lock:
                    self.config.put_bytes(self._window_cap + CAP_PCI_CFG_DATA, data)
        return super().config_read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        super().config_write(offset, data)
        with self._lock:
            self._update_intx()     # MSI-X may have been switched on or off
        if self._touches_window_data(offset, len(data)):
            target = self._window_target()
            if target is not None:   # outside the config lock: this may start the device
                bar, bar_offset, length = target
                with self._lock:
                    payload = self.config.read(self._window_cap + CAP_PCI_CFG_DATA, length)
                self._bar_access_write(bar, bar_offset, payload)

    def _touches_window_data(self, offset: int, size: int) -> bool:
        start = self._window_cap + CAP_PCI_CFG_DATA
        return offset < start + 4 and start < offset + size

    def _window_target(self) -> tuple[int, int, int] | None:
        """(bar, offset, length) the PCI_CFG capability points at, or None if that is not an
        aligned 1-, 2- or 4-byte access inside one of our memory BARs."""
        with self._lock:
            cap = self._window_cap
            bar = self.config.get(cap + CAP_BAR, 1)
            offset = self.config.get(cap + CAP_OFFSET, 4)
            length = self.config.get(cap + CAP_LENGTH, 4)
        target = self.config.bars.get(bar)
        if (length not in (1, 2, 4) or target is None or target.is_io or offset % length
                or offset + length > target.size):
            log.debug("%s: PCI_CFG window at BAR %d %#x+%d is not usable", self.name, bar, offset, length)
            return None
        return bar, offset, length

    # --- snapshots ------------------------------------------------------------------------------

    def save(self) -> VirtioPciState:
        device_state = self.device.save()   # first, without our locks: the device lock comes first
        with self._register_lock, self._lock:
            return VirtioPciState(pci=self.save_pci(), core=self.core_save(), isr=self._isr,
                                  config_vector=self._config_vector, queue_vectors=tuple(self._queue_vectors),
                                  device=device_state)

    def check_restorable(self, state: State) -> None:
        state = require(state, VirtioPciState)
        if len(state.queue_vectors) != len(self.device.queues):
            state.fail("queue_vectors", f"{len(state.queue_vectors)} vectors, {self.name} has "
                                        f"{len(self.device.queues)} queues")
        for name, vector in (("config_vector", state.config_vector), *(
                (f"queue_vectors[{i}]", v) for i, v in enumerate(state.queue_vectors))):
            if vector != NO_VECTOR and not 0 <= vector < self._msix.vectors:
                state.fail(name, f"{vector} is not one of {self._msix.vectors} MSI-X vectors")
        self.check_pci(state.pci)
        self.device.check_restorable(state.device)

    def restore(self, state: State) -> None:
        """Load a save() into a transport for the same kind of device; BARs are remapped (and
        on_notify_moved told), MSI vectors reconfigured, INTx driven to the restored ISR.
        The device comes last: its restore may complete work (vsock's RST for a connection whose
        host end is gone) and interrupt the guest, which must reach the restored vectors and ISR,
        not be overwritten by them (the used ring would say the guest was told)."""
        self.check_restorable(state)
        assert isinstance(state, VirtioPciState)
        with self._register_lock:
            self.core_restore(state.core)
            self._config_vector = state.config_vector
            self._queue_vectors = list(state.queue_vectors)
            with self._lock:
                self._isr = state.isr
        self.restore_pci(state.pci)
        with self._lock:
            self._update_intx()
        self.device.restore(state.device)


@dataclass(frozen=True)
class VirtioPciState(State):
    """The PCI function, the virtio registers, the interrupt status and vector assignments, and
    the device behind them."""
    KIND = "virtio_pci"
    pci: PciDeviceState
    core: TransportCoreState
    isr: int
    config_vector: int
    queue_vectors: tuple[int, ...]
    device: State

    def validate(self) -> None:
        self.check_mask("isr", ISR_QUEUE | ISR_CONFIG)
        self.check_range("config_vector", 0, 0xFFFF)
        self.check_items("queue_vectors", 0, 0xFFFF)
