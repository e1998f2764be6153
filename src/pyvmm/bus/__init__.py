"""Address-range buses (port I/O, MMIO) and the interrupt-line protocol devices raise."""

from .bus import Bus, BusConflict, BusDevice, MmioBus, PioBus, Window
from .interrupt import IrqLine, NullIrqLine

__all__ = ["Bus", "BusConflict", "BusDevice", "MmioBus", "PioBus", "Window", "IrqLine", "NullIrqLine"]
