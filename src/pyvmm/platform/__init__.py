"""Interrupt controllers and timers for the software CPU (KVM keeps its own in the kernel).

Pure state machines: no threads, no ioctls, time passed in as guest nanoseconds.
"""

from .apic_bus import ApicBus, DeliveryMode, PlatformLock, Shorthand
from .clock import DEFAULT_TSC_HZ, VirtualClock, ns_from_tsc, tsc_from_ns
from .ioapic import IOAPIC_BASE, IOAPIC_WINDOW, IoApic
from .irq_router import GsiLine, IsaIrqLine, IsaIrqRouter, isa_irq_to_gsi
from .lapic import LAPIC_BASE, LAPIC_WINDOW, LocalApic
from .pic import Pic8259Pair
from .pit import PIT_HZ, Pit8254, SystemControlPortB

__all__ = [
    "ApicBus", "DeliveryMode", "PlatformLock", "Shorthand",
    "DEFAULT_TSC_HZ", "VirtualClock", "ns_from_tsc", "tsc_from_ns",
    "IOAPIC_BASE", "IOAPIC_WINDOW", "IoApic",
    "GsiLine", "IsaIrqLine", "IsaIrqRouter", "isa_irq_to_gsi",
    "LAPIC_BASE", "LAPIC_WINDOW", "LocalApic",
    "Pic8259Pair",
    "PIT_HZ", "Pit8254", "SystemControlPortB",
]
