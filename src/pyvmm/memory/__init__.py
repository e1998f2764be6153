"""Guest physical memory: addresses, RAM regions, bounds-checked access, dirty-page tracking."""

from .address import GuestAddress
from .guest_memory import GuestMemory, GuestMemoryError, MemoryRegion

__all__ = ["GuestAddress", "GuestMemory", "GuestMemoryError", "MemoryRegion"]
