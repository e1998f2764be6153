"""virtio-mmio (virtio 1.2 section 4.2, version 2 register layout) in front of any VirtioDevice.

Linux finds it through the DSDT (LNRO0005, see arch/x86_64/acpi.virtio_mmio_device): one
512-byte register window and one interrupt. The interrupt is edge-triggered: every signal
sets a bit in InterruptStatus and pulses the line, which also lets KVM inject it through
an irqfd.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from ...bus.interrupt import IrqLine
from ...persist import State, require
from .device import VirtioDevice
from .transport import TransportCoreState, VirtioTransportCore

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


class VirtioMmioTransport(VirtioTransportCore):
    def __init__(self, device: VirtioDevice, irq: IrqLine, memory) -> None:
        self._init_core(device)
        self.irq = irq
        self.interrupt_status = 0
        device.attach(memory, self)

    # --- VirtioInterrupt (called by the device, any thread) -----------------------------------------

    def signal_used(self, queue_index: int) -> None:
        self._raise(INT_USED_BUFFER)

    def signal_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._raise(INT_CONFIG_CHANGE)

    def set_needs_reset(self) -> None:
        if self.mark_needs_reset():
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
        queue = self.selected_queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.device_features_word()
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
            self.write_status(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self.write_driver_features_word(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        else:
            self._write_queue_register(offset, value)

    def _write_queue_register(self, offset: int, value: int) -> None:
        # Once the driver is running it may only take a queue down: a queue brought up now
        # was never checked and activated.
        queue = self.selected_queue() if offset == QUEUE_READY and not value & 1 else self.queue_for_setup()
        if queue is None:
            return
        if offset == QUEUE_NUM:
            queue.size = value
        elif offset == QUEUE_READY:
            queue.ready = bool(value & 1)
        elif offset in _QUEUE_ADDRESS:
            name, shift = _QUEUE_ADDRESS[offset]
            mask = 0xFFFFFFFF << shift
            setattr(queue, name, (getattr(queue, name) & ~mask) | (value << shift))

    def reset(self) -> None:
        super().reset()
        self.interrupt_status = 0

    # --- snapshot ---------------------------------------------------------------------------------

    def save(self) -> MmioTransportState:
        device_state = self.device.save()
        return MmioTransportState(core=self.core_save(), interrupt_status=self.interrupt_status, device=device_state)

    def check_restorable(self, state: State) -> None:
        self.device.check_restorable(require(state, MmioTransportState).device)

    def restore(self, state: MmioTransportState) -> None:
        """The device's restore checks its state before changing anything; the transport's own
        fields are all checked by the state, so nothing is half-restored. The device comes last:
        an interrupt its restore raises adds to the restored status instead of being overwritten."""
        state = require(state, MmioTransportState)
        self.device.check_restorable(state.device)
        self.core_restore(state.core)
        self.interrupt_status = state.interrupt_status
        self.device.restore(state.device)


@dataclass(frozen=True)
class MmioTransportState(State):
    KIND = "virtio_mmio"
    core: TransportCoreState
    interrupt_status: int
    device: State

    def validate(self) -> None:
        self.check_mask("interrupt_status", INT_USED_BUFFER | INT_CONFIG_CHANGE)
