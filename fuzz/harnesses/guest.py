"""Fake guest RAM filled from the input, and queues programmed the way a hostile driver might."""

from __future__ import annotations

from pyvmm.devices.virtio.queue import SplitQueue
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

from .reader import Reader

RAM = 256 << 10   # small: addresses drawn from the input land in it often
_memory: GuestMemory | None = None


def memory() -> GuestMemory:
    """One guest RAM for the process (made once: a memfd and a mapping per input would dominate)."""
    global _memory
    if _memory is None:
        _memory = GuestMemory.from_specs([RegionSpec(0, RAM)])
    return _memory


def fill(mem: GuestMemory, r: Reader) -> None:
    """Zero the RAM, then scatter the input's bytes into it: a few windows at input-chosen places."""
    mem.fill(0, RAM)
    for _ in range(r.u8() % 8 + 1):
        if not r.left:
            break
        address = r.below(RAM)
        chunk = r.take(min(r.u16() % 4096 + 1, RAM - address))
        mem.write(address, chunk)


def address(r: Reader) -> int:
    """Mostly in RAM and aligned, sometimes anywhere (a ring outside RAM must be refused)."""
    if r.u8() < 16:
        return r.u64()
    return r.below(RAM) & ~0xF


def program_queue(queue: SplitQueue, r: Reader) -> None:
    """What a driver writes to a queue's registers before enabling it."""
    queue.size = r.choice((1, 2, 4, 8, 16, 32, 64, 128, 256, 0, 3, 1 << 16, queue.max_size))
    queue.desc_table, queue.avail_ring, queue.used_ring = address(r), address(r), address(r)
    queue.ready = r.u8() != 0
