"""A fake virtio driver in fake guest RAM: builds split rings and requests the way a guest does.

    memory = GuestMemory.from_specs([RegionSpec(0, 4 << 20)])
    device = SomeVirtioDevice(...)
    driver = FakeDriver(memory, device)            # negotiates, lays out every queue, DRIVER_OK
    head = driver.queue(0).add([b"request"], [512])  # one readable buffer, one 512-byte writable one
    device.notify(0)
    [(head, written)] = driver.queue(0).take_used()
    data = driver.queue(0).written(head)[:written]

The driver talks to the device directly (no transport) unless a transport test does it itself.
Raw helpers (`put_descriptor`, `publish`) let tests build malformed chains on purpose.
"""

from __future__ import annotations

import struct

from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


def needs_kick(avail_event: int, new: int, old: int) -> bool:
    """The driver's side of EVENT_IDX (virtio 1.2, 2.7.10: vring_need_event)."""
    return (new - avail_event - 1) & 0xFFFF < (new - old) & 0xFFFF


class Interrupts:
    """A VirtioInterrupt that records what the device signalled."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.config = 0
        self.needs_reset = False

    def signal_used(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def signal_config(self) -> None:
        self.config += 1

    def set_needs_reset(self) -> None:
        self.needs_reset = True


class BumpAllocator:
    def __init__(self, start: int, end: int) -> None:
        self.next, self.end = start, end

    def alloc(self, size: int, align: int = 16) -> int:
        address = (self.next + align - 1) & -align
        if address + size > self.end:
            raise MemoryError("fake guest RAM exhausted")
        self.next = address + size
        return address


class DriverQueue:
    def __init__(self, memory, allocator: BumpAllocator, size: int, *, event_idx: bool = False) -> None:
        self.memory, self.allocator, self.size, self.event_idx = memory, allocator, size, event_idx
        self.desc_table = allocator.alloc(16 * size, 16)
        self.avail_ring = allocator.alloc(6 + 2 * size, 2)
        self.used_ring = allocator.alloc(6 + 8 * size, 4)
        memory.fill(self.desc_table, self.used_ring + 6 + 8 * size - self.desc_table)  # as a driver's allocation
        self.avail_idx = 0
        self.last_used = 0
        self.next_free = 0
        self.writable: dict[int, list[tuple[int, int]]] = {}

    # raw ring access
    def put_descriptor(self, index: int, address: int, length: int, flags: int = 0, next_index: int = 0,
                       table: int | None = None) -> None:
        base = self.desc_table if table is None else table
        self.memory.write(base + 16 * index, struct.pack("<QIHH", address, length, flags, next_index))

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail_ring + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail_ring + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail_ring + 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail_ring + 4 + 2 * self.size, value)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail_ring, flags)

    def buffer(self, data: bytes | int) -> int:
        size = data if isinstance(data, int) else len(data)
        address = self.allocator.alloc(max(size, 1), 8)
        if not isinstance(data, int):
            self.memory.write(address, data)
        return address

    # requests
    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> int:
        """Queue one request; returns its head descriptor index."""
        buffers = [(self.buffer(b), len(b), 0) for b in readable] + \
                  [(self.buffer(n), n, VIRTQ_DESC_F_WRITE) for n in writable]
        head = self.next_free
        if indirect:
            table = self.allocator.alloc(16 * len(buffers), 16)
            for i, (address, length, flags) in enumerate(buffers):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0
                self.put_descriptor(i, address, length, flags | more, i + 1, table=table)
            self.put_descriptor(head, table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT)
            self.next_free = (self.next_free + 1) % self.size
        else:
            for i, (address, length, flags) in enumerate(buffers):
                index = (head + i) % self.size
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0
                self.put_descriptor(index, address, length, flags | more, (index + 1) % self.size)
            self.next_free = (self.next_free + max(len(buffers), 1)) % self.size
        self.writable[head] = [(a, n) for a, n, f in buffers if f]
        self.publish(head)
        return head

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_ring + 2)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used_ring + 4 + 8 * self.size)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, bytes written) of every request the device completed since the last call."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.memory.read(self.used_ring + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def written(self, head: int) -> bytes:
        return b"".join(self.memory.read(a, n) for a, n in self.writable.get(head, []))


class FakeDriver:
    """Negotiates features and brings every queue of `device` up, like a guest driver at probe."""

    def __init__(self, memory, device, *, features: int | None = None, queue_size: int | None = None,
                 ram_start: int = 0x10000, interrupts: Interrupts | None = None, activate: bool = True) -> None:
        self.memory, self.device = memory, device
        self.interrupts = interrupts or Interrupts()
        device.attach(memory, self.interrupts)
        end = min(r.guest_end for r in memory.regions)
        self.allocator = BumpAllocator(ram_start, end)
        device.set_driver_features(device.offered_features if features is None else features)
        event_idx = bool(device.acked_features & VIRTIO_F_EVENT_IDX)
        self.indirect = bool(device.acked_features & VIRTIO_F_INDIRECT_DESC)
        self.queues: list[DriverQueue] = []
        for queue in device.queues:
            size = min(queue_size or queue.max_size, queue.max_size)
            q = DriverQueue(memory, self.allocator, size, event_idx=event_idx)
            queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, q.desc_table, q.avail_ring, q.used_ring
            queue.ready = True
            self.queues.append(q)
        if activate:
            device.activate()

    def queue(self, index: int) -> DriverQueue:
        return self.queues[index]
