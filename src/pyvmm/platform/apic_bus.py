"""The APIC bus: carries interrupt messages from the IOAPIC and from IPIs to local APICs,
and EOI broadcasts from local APICs back to the IOAPIC.

A message names a destination the way the sender's registers do:

    physical mode  destination = APIC ID; 0xFF is a broadcast
    logical mode   flat model (DFR 0xF...): destination is a bitmask matched against LDR[31:24]
                   cluster model (DFR 0x0...): high nibble = cluster (0xF all), low nibble = bitmask

Lowest-priority delivery is treated as fixed to the first matching LAPIC (lowest APIC ID):
arbitration by task priority buys a guest nothing here.

Locking: the bus owns the `PlatformLock` that the IOAPIC and every LAPIC on it share, so a
message can travel IOAPIC -> LAPIC and an EOI LAPIC -> IOAPIC -> LAPIC (re-delivery) without
lock-order problems. Wake-up callbacks requested while it is held run after the outermost
holder releases it.
"""

from __future__ import annotations

import logging
import threading
from enum import IntEnum
from typing import TYPE_CHECKING, Callable, Final, Protocol

if TYPE_CHECKING:
    from .lapic import LocalApic

log = logging.getLogger(__name__)

BROADCAST_ID: Final = 0xFF


class EoiListener(Protocol):
    """What hears the EOI of a level-triggered vector: an IOAPIC (its Remote IRR)."""

    def end_of_interrupt(self, vector: int) -> None: ...


class DeliveryMode(IntEnum):
    FIXED = 0
    LOWEST_PRIORITY = 1
    SMI = 2
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class Shorthand(IntEnum):
    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


class PlatformLock:
    """A re-entrant lock whose holders can ask for callbacks to run once it is fully released.

    Wake-up callbacks (which may take the CPU loop's own lock) must not run under the
    platform lock, or a CPU thread holding its lock while querying the platform would
    deadlock against a device thread raising an interrupt."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.raw = self._lock  # for holders that defer nothing: the lock without this class's frames
        self._depth = 0
        self._deferred: list[Callable[[], None]] = []

    def __enter__(self) -> "PlatformLock":
        self._lock.acquire()
        self._depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self._depth -= 1
        callbacks: list[Callable[[], None]] = []
        if self._depth == 0 and self._deferred:
            callbacks, self._deferred = self._deferred, []
        self._lock.release()
        for callback in callbacks:
            callback()

    def defer(self, callback: Callable[[], None] | None) -> None:
        """Run `callback` when the lock is released by its outermost holder (call with it held)."""
        if callback is not None and callback not in self._deferred:
            self._deferred.append(callback)


class ApicBus:
    """The LAPICs and IOAPICs of one machine."""

    def __init__(self) -> None:
        self.lock = PlatformLock()
        self._lapics: list[LocalApic] = []
        self._ioapics: list[EoiListener] = []
        self.messages_delivered = 0
        self.messages_unclaimed = 0

    # --- membership (done by the LocalApic / IoApic constructors) ----------------------------

    def attach_lapic(self, lapic: "LocalApic") -> None:
        with self.lock:
            if any(other.initial_apic_id == lapic.initial_apic_id for other in self._lapics):
                raise ValueError(f"apic bus: APIC ID {lapic.initial_apic_id} is already taken")
            self._lapics.append(lapic)
            self._lapics.sort(key=lambda other: other.initial_apic_id)

    def detach_lapic(self, lapic: "LocalApic") -> None:
        """A vCPU unplugged: messages no longer reach its LAPIC."""
        with self.lock:
            self._lapics = [other for other in self._lapics if other is not lapic]

    def attach_ioapic(self, ioapic: EoiListener) -> None:
        with self.lock:
            self._ioapics.append(ioapic)

    @property
    def lapics(self) -> tuple["LocalApic", ...]:
        return tuple(self._lapics)

    def lapic(self, apic_id: int) -> "LocalApic | None":
        for lapic in self._lapics:
            if lapic.initial_apic_id == apic_id:
                return lapic
        return None

    # --- messages ----------------------------------------------------------------------------

    def targets(self, destination: int, logical: bool, shorthand: int = Shorthand.NONE,
                source: "LocalApic | None" = None) -> list["LocalApic"]:
        """The LAPICs a message reaches (hardware-disabled ones hear nothing)."""
        with self.lock:
            return self._targets(destination, logical, shorthand, source)

    def _targets(self, destination: int, logical: bool, shorthand: int,
                 source: "LocalApic | None") -> list["LocalApic"]:
        # (bus lock held; every device interrupt comes through here: one loop, no nested lock)
        if shorthand == Shorthand.NONE and logical:
            return [lapic for lapic in self._lapics if lapic.hardware_enabled and lapic.matches_logical(destination)]
        listening = [lapic for lapic in self._lapics if lapic.hardware_enabled]
        if shorthand == Shorthand.SELF:
            return [source] if source is not None and source in listening else []
        if shorthand == Shorthand.ALL_INCLUDING_SELF:
            return listening
        if shorthand == Shorthand.ALL_EXCLUDING_SELF:
            return [lapic for lapic in listening if lapic is not source]
        if destination == BROADCAST_ID:
            return listening
        return [lapic for lapic in listening if lapic.apic_id == destination]

    def deliver(self, vector: int, delivery_mode: int, destination: int, logical: bool, *,
                level_triggered: bool = False, shorthand: int = Shorthand.NONE,
                source: "LocalApic | None" = None) -> int:
        """Send one interrupt message; returns how many LAPICs accepted it."""
        with self.lock:
            targets = self._targets(destination, logical, shorthand, source)
            if delivery_mode == DeliveryMode.LOWEST_PRIORITY and len(targets) > 1:
                targets = targets[:1]
            if not targets:
                self.messages_unclaimed += 1
                log.debug("apic bus: vector %#04x mode %d to %s %#04x reached no LAPIC", vector,
                          delivery_mode, "logical" if logical else "physical", destination)
                return 0
            for lapic in targets:
                lapic.receive_message(vector, delivery_mode, level_triggered)
            self.messages_delivered += len(targets)
            return len(targets)

    def broadcast_eoi(self, vector: int) -> None:
        """A LAPIC retired a level-triggered `vector`: tell every IOAPIC (clears Remote IRR)."""
        with self.lock:
            for ioapic in self._ioapics:
                ioapic.end_of_interrupt(vector)
