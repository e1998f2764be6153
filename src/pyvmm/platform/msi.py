"""MSI for the software CPU: a device's message decoded and sent over the APIC bus.

KVM injects MSIs in the kernel (irqfd + GSI routing); here the same message, as the guest
programmed it into an MSI capability or MSI-X table entry, becomes an `ApicBus.deliver`,
which marks the vector in the target LAPICs and wakes the software CPU's scheduler.

x86 message format (Intel SDM vol. 3, "Message Signalled Interrupts"):
    address  bits 31-20 0xFEE, 19-12 destination APIC ID, 3 redirection hint, 2 destination
             mode (1 = logical)
    data     bits 7-0 vector, 10-8 delivery mode, 14 level (assert), 15 trigger mode (1 = level)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Final

from .apic_bus import ApicBus

log = logging.getLogger(__name__)

MSI_ADDRESS_WINDOW: Final = 0xFEE00000
MSI_ADDRESS_WINDOW_MASK: Final = 0xFFF00000
MSI_ADDRESS_LOGICAL: Final = 1 << 2
MSI_DATA_LEVEL_TRIGGERED: Final = 1 << 15


@dataclass(frozen=True)
class MsiMessage:
    vector: int
    delivery_mode: int
    destination: int
    logical: bool
    level_triggered: bool


def decode_msi(address: int, data: int) -> MsiMessage | None:
    """The interrupt an MSI write means, or None when `address` is outside the 0xFEExxxxx window
    (on hardware that write would land in memory, not at a LAPIC)."""
    if address & ~0xFFFFFFFF or address & MSI_ADDRESS_WINDOW_MASK != MSI_ADDRESS_WINDOW:
        return None
    return MsiMessage(
        vector=data & 0xFF,
        delivery_mode=(data >> 8) & 7,
        destination=(address >> 12) & 0xFF,
        logical=bool(address & MSI_ADDRESS_LOGICAL),
        level_triggered=bool(data & MSI_DATA_LEVEL_TRIGGERED),
    )


class SoftwareMsiVector:
    """An MsiVector on the software platform's APIC bus. Thread-safe; no eventfd shortcut."""

    eventfd: int | None = None

    def __init__(self, apic_bus: ApicBus) -> None:
        self._bus = apic_bus
        self._lock = threading.Lock()
        self._message: MsiMessage | None = None
        self._masked = True  # MSI-X entries come out of reset masked
        self._closed = False
        self.address = self.data = 0
        self.delivered = 0
        self.dropped = 0

    def configure(self, address: int, data: int, masked: bool) -> None:
        if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
            raise ValueError(f"msi: address {address:#x} / data {data:#x} out of range (64 / 32 bits)")
        message = decode_msi(address, data)
        with self._lock:
            self.address, self.data, self._message, self._masked = address, data, message, bool(masked)

    @property
    def masked(self) -> bool:
        return self._masked

    def trigger(self) -> None:
        with self._lock:
            message, masked, closed = self._message, self._masked, self._closed
        if masked or closed:
            return
        if message is None:
            # Usually an unprogrammed entry (address 0): nothing a LAPIC would hear.
            self.dropped += 1
            log.debug("msi: address %#x is not an interrupt address, message dropped", self.address)
            return
        # The bus takes its own lock and wakes the scheduler once it releases it.
        self._bus.deliver(message.vector, message.delivery_mode, message.destination, message.logical,
                          level_triggered=message.level_triggered)
        self.delivered += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return f"SoftwareMsiVector(address={self.address:#x}, data={self.data:#x}, masked={self._masked})"
