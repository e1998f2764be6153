"""virtio-mmio (virtio 1.2 section 4.2, version 2 register layout) in front of any VirtioDevice.

Linux finds it through the DSDT (LNRO0005, see arch/x86_64/acpi.virtio_mmio_device): one
512-byte register window and one interrupt. The interrupt is edge-triggered: every signal
sets a bit in InterruptStatus and pulses the line, which also lets KVM inject it through
an irqfd.
"""

from __future__ import annotations

import logging
import struct
from typing import Callable

from ...bus.interrupt import IrqLine
from .device import (
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, VirtioDevice,
)

log = logging.getLogger(__name__)

MMIO_WINDOW = 0x200
MAGIC = 0x74726976          # "virt"
VERSION = 2
VENDOR_ID = 0x4D565950      # "PYVM"

MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

_QUEUE_ADDRESS = {
    QUEUE_DESC_LOW: ("desc_table", 0), QUEUE_DESC_HIGH: ("desc_table", 32),
    QUEUE_DRIVER_LOW: ("avail_ring", 0), QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    QUEUE_DEVICE_LOW: ("used_ring", 0), QUEUE_DEVICE_HIGH: ("used_ring", 32),
}


class VirtioMmioTransport:
    def __init__(self, device: VirtioDevice, irq: IrqLine, memory) -> None:
        self.device = device
        self.irq = irq
        # Who serves a kick: the device inline by default; an I/O thread when wired to an eventfd.
        self.on_notify: Callable[[int], None] = device.notify
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        device.attach(memory, self)

    # --- VirtioInterrupt (called by the device, any thread) -----------------------------------------

    def signal_used(self, queue_index: int) -> None:
        self._raise(INT_USED_BUFFER)

    def signal_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._raise(INT_CONFIG_CHANGE)

    def set_needs_reset(self) -> None:
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self.signal_config()

    def _raise(self, bit: int) -> None:
        self.interrupt_status |= bit
        self.irq.trigger()

    # --- where KVM can take the kicks without a VM exit ---------------------------------------------

    def notify_offsets(self) -> list[tuple[int, int, int]]:
        """(offset, length, value) of each queue's kick: register an ioeventfd with datamatch."""
        return [(QUEUE_NOTIFY, 4, index) for index in range(len(self.device.queues))]

    # --- registers -------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG:
            return self.device.read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            log.debug("virtio-mmio: %d-byte read at %#x ignored", size, offset)
            return bytes(size)
        return struct.pack("<I", self._read_register(offset) & 0xFFFFFFFF)

    def _read_register(self, offset: int) -> int:
        device = self.device
        queue = device.queues[self.queue_sel] if self.queue_sel < len(device.queues) else None
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return device.offered_features >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in _QUEUE_ADDRESS and queue:
            name, shift = _QUEUE_ADDRESS[offset]
            return getattr(queue, name) >> shift
        return 0

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, data)
            return
        if len(data) != 4 or offset % 4:
            log.debug("virtio-mmio: %d-byte write at %#x ignored", len(data), offset)
            return
        value = struct.unpack("<I", data)[0]
        if offset == QUEUE_NOTIFY:
            self.on_notify(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & STATUS_FEATURES_OK or self.driver_features_sel > 1:
                return
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        else:
            self._write_queue_register(offset, value)

    def _write_queue_register(self, offset: int, value: int) -> None:
        device = self.device
        if self.queue_sel >= len(device.queues) or self.status & STATUS_DRIVER_OK and offset != QUEUE_READY:
            return  # queue setup is frozen once the driver is running
        queue = device.queues[self.queue_sel]
        if offset == QUEUE_NUM:
            queue.size = value
        elif offset == QUEUE_READY:
            queue.ready = bool(value & 1)
        elif offset in _QUEUE_ADDRESS:
            name, shift = _QUEUE_ADDRESS[offset]
            mask = 0xFFFFFFFF << shift
            setattr(queue, name, (getattr(queue, name) & ~mask) | (value << shift))

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old, self.status = self.status, value | (self.status & STATUS_DEVICE_NEEDS_RESET)
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            self.device.set_driver_features(self.driver_features)
            if self.driver_features & ~self.device.offered_features or not self.device.features_ok():
                self.status &= ~STATUS_FEATURES_OK  # the driver reads it back and gives up
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK and not value & STATUS_FAILED:
            self.device.activate()

    def reset(self) -> None:
        self.device.reset()
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        self.interrupt_status = 0

    # --- snapshot ---------------------------------------------------------------------------------

    def save(self) -> dict:
        return {"status": self.status, "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel, "driver_features": self.driver_features,
                "queue_sel": self.queue_sel, "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation, "device": self.device.save()}

    def restore(self, state: dict) -> None:
        state = dict(state)
        self.device.restore(state.pop("device"))
        for name, value in state.items():
            setattr(self, name, value)
