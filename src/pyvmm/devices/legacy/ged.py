"""The Generic Event Device's event register: how the VMM raises ACPI events on a
hardware-reduced platform (no GPE blocks, no fixed power button).

One 32-bit register (layout.GED_PORT, 4 ports) and one edge-triggered interrupt
(layout.GED_GSI). The VMM sets event bits and pulses the interrupt; Linux's GED driver
(ACPI0013) runs the DSDT's _EVT method, which reads the register and notifies the device
each bit stands for (arch/x86_64/ged.py). Reading returns the pending bits and clears them,
so an event is handled once however many times the interrupt fired; writes are ignored.

    bit 0  power button pressed: _EVT does Notify(\\_SB.PWRB, 0x80)
    bit 1  new VM generation ID (a restored VM): _EVT does Notify(\\_SB.VGEN, 0x80)
    bit 2  PCI hotplug: _EVT calls \\_SB.PCI0.PCNT, which notifies the slots (pci_hotplug.py)
    bit 3  CPU hotplug: _EVT calls \\_SB.CPUS.CSCN, which notifies the processors (cpu_hotplug.py)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ...bus.interrupt import IrqLine
from ...persist import State

log = logging.getLogger(__name__)

PORT_COUNT = 4
EVENT_POWER_BUTTON = 1 << 0
EVENT_VM_GENERATION = 1 << 1
EVENT_PCI_HOTPLUG = 1 << 2
EVENT_CPU_HOTPLUG = 1 << 3
EVENTS = EVENT_POWER_BUTTON | EVENT_VM_GENERATION | EVENT_PCI_HOTPLUG | EVENT_CPU_HOTPLUG


class GenericEventDevice:
    def __init__(self, irq: IrqLine) -> None:
        self._irq = irq
        self._lock = threading.Lock()  # the VMM raises events on its threads, the guest reads on a vCPU's
        self._pending = 0

    def raise_event(self, events: int) -> None:
        """Latch `events` (EVENT_* bits) and interrupt the guest. Safe from any thread."""
        if events & ~EVENTS or not events:
            raise ValueError(f"unknown GED event bits {events:#x}")
        with self._lock:
            self._pending |= events
        self._irq.trigger()

    def press_power_button(self) -> None:
        log.info("ACPI power button pressed")
        self.raise_event(EVENT_POWER_BUTTON)

    def new_vm_generation(self) -> None:
        """Tell the guest its VM generation ID changed (arch/x86_64/vmgenid.py)."""
        log.info("VM generation ID changed")
        self.raise_event(EVENT_VM_GENERATION)

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value, self._pending = self._pending, 0
        # A partial or unaligned read sees the bytes of the register it covers (and clears it).
        return value.to_bytes(PORT_COUNT, "little")[offset:offset + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        pass

    def save(self) -> GedState:
        return GedState(pending=self.pending)

    def restore(self, state: GedState) -> None:
        """Pending events are delivered again: the interrupt may have been lost with the old VM."""
        with self._lock:
            self._pending = state.pending
        if state.pending:
            self._irq.trigger()


@dataclass(frozen=True)
class GedState(State):
    KIND = "ged"
    pending: int = 0

    def validate(self) -> None:
        self.check_mask("pending", EVENTS)
