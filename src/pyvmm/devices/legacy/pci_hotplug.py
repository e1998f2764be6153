"""The ACPI PCI hotplug controller: how the VMM tells the guest a root-bus slot filled or
should empty, and how the guest says it let a device go.

Three 32-bit registers at layout.PCI_HOTPLUG_PORT, one bit per slot of bus 0:

    +0  INSERTED  read: slots that received a device since the last read (reading clears)
    +4  REMOVING  read: slots whose device the VMM asks the guest to eject (reading clears)
    +8  EJECTED   write: slots the guest has ejected (a slot's _EJ0 writes its bit)

The VMM sets a bit and raises the Generic Event Device's PCI-hotplug event; the DSDT's
\\_SB.PCI0.PCNT (arch/x86_64/pci_hotplug.py) reads both bitmaps and notifies each slot's
device object: Notify 1 (bus check: Linux's acpiphp scans the slot and binds a driver),
Notify 3 (eject request: acpiphp stops and removes the device, then runs the slot's _EJ0).
The VMM waits for the EJECTED bit before it takes the device away (wait_ejected).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ...persist import State

log = logging.getLogger(__name__)

PORT_COUNT = 12
INSERTED, REMOVING, EJECTED = 0, 4, 8
SLOT_MASK = 0xFFFFFFFE       # slot 0 is the host bridge


class PciHotplugController:
    def __init__(self, notify: Callable[[], None]) -> None:
        """`notify()` interrupts the guest (the GED's PCI-hotplug event)."""
        self._notify = notify
        self._changed = threading.Condition()  # the VMM's threads wait; a vCPU thread writes
        self._inserted = 0
        self._removing = 0
        self._ejected = 0

    def _check(self, slot: int) -> int:
        if not 1 <= slot < 32:
            raise ValueError(f"PCI slot {slot} is not hot-pluggable (1-31)")
        return 1 << slot

    def device_inserted(self, slot: int) -> None:
        """A device was plugged into `slot`: ask the guest to scan it."""
        bit = self._check(slot)
        with self._changed:
            self._inserted |= bit
            self._removing &= ~bit
            self._ejected &= ~bit
        self._notify()

    def request_eject(self, slot: int) -> None:
        """Ask the guest to release the device in `slot` (wait_ejected says when it has)."""
        bit = self._check(slot)
        with self._changed:
            self._removing |= bit
            self._inserted &= ~bit
            self._ejected &= ~bit
        self._notify()

    def wait_ejected(self, slot: int, timeout: float | None) -> bool:
        """True once the guest ejected `slot`; False after `timeout` seconds."""
        bit = self._check(slot)
        with self._changed:
            return bool(self._changed.wait_for(lambda: self._ejected & bit, timeout))

    def cancel(self, slot: int) -> None:
        """Forget a request for `slot` (the device left by force, or stays after all)."""
        bit = self._check(slot)
        with self._changed:
            self._inserted &= ~bit
            self._removing &= ~bit
            self._ejected &= ~bit

    def read(self, offset: int, size: int) -> bytes:
        with self._changed:
            if offset < REMOVING:
                value, self._inserted = self._inserted, 0
            elif offset < EJECTED:
                value, self._removing = self._removing, 0
            else:
                value = 0
        start = offset % 4
        return value.to_bytes(4, "little")[start:start + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        if offset != EJECTED:
            return
        value = int.from_bytes(data[:4].ljust(4, b"\0"), "little") & SLOT_MASK
        with self._changed:
            self._ejected |= value
            self._changed.notify_all()
        log.info("guest ejected PCI slot(s) %s", [s for s in range(32) if value >> s & 1])

    def save(self) -> PciHotplugState:
        with self._changed:
            return PciHotplugState(inserted=self._inserted, removing=self._removing)

    def restore(self, state: PciHotplugState) -> None:
        """Requests the guest had not read yet are raised again (the interrupt went with the old VM)."""
        with self._changed:
            self._inserted, self._removing, self._ejected = state.inserted, state.removing, 0
        if state.inserted or state.removing:
            self._notify()


@dataclass(frozen=True)
class PciHotplugState(State):
    KIND = "pci-hotplug"
    inserted: int = 0
    removing: int = 0

    def validate(self) -> None:
        self.check_mask("inserted", SLOT_MASK)
        self.check_mask("removing", SLOT_MASK)
