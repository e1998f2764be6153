"""The split virtqueue parser: rings and descriptor chains (loops, indexes and buffers out of
range, indirect tables nested or misused) built from the input. Allowed outcomes: a chain, None,
or VirtqueueBroken / GuestMemoryError (the device then needs a reset). Checked: every buffer
handed out lies in guest RAM, readable before writable, at most 4 GiB per chain."""

from __future__ import annotations

from pyvmm.devices.virtio.queue import MAX_CHAIN_BYTES, SplitQueue, VirtqueueBroken
from pyvmm.memory.guest_memory import GuestMemoryError

from .guest import fill, memory, program_queue
from .reader import Reader


def one_input(data: bytes) -> None:
    r = Reader(data)
    mem = memory()
    queue = SplitQueue(256)
    program_queue(queue, r)
    event_idx, indirect = r.flag(), r.flag()
    plan = r.take(64)           # what to do with each chain: push, undo, push a length
    fill(mem, r)
    try:
        queue.activate(mem, event_idx=event_idx, indirect=indirect)
    except VirtqueueBroken:
        return
    try:
        for step in range(64):
            chain = queue.pop()
            if chain is None:
                break
            total = 0
            for addr, length in chain.readable + chain.writable:
                assert length > 0 and mem.contains(addr, length), (addr, length)
                total += length
            assert total <= MAX_CHAIN_BYTES
            action = plan[step] if step < len(plan) else 0
            if action % 5 == 4:
                queue.undo_pop(chain)
                again = queue.pop()
                assert again is not None and again.head == chain.head
                chain = again
            queue.push(chain, action * 977)
            queue.needs_interrupt()
            queue.notify_on_next_add()
        assert len(queue.in_flight) <= queue.size
    except (VirtqueueBroken, GuestMemoryError):
        return
