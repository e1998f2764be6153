"""virtio-net's receive buffers, per buffer: taken off the ring with their views, and returned
filled. Compiled with the hot-path group (pyvmm/compiled.py).

Why apart from net.py: Linux posts each mergeable receive buffer as a chain of one page-sized
piece, so a 64 KiB frame from a TAP with offloads fills about 17 of them, and these two loops
ran interpreted once per buffer on the I/O thread, which shares the VM's one host CPU with the
guest (host/cpu_affinity.py): under `iperf3 -R` the guest stood idle half the time while the
VMM worked. The device (net.py) keeps the state (the chains it holds, their views) and the
policy (how much to take, what a frame does); these functions only walk the buffers.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from typing import Final

from ...memory.guest_memory import GuestMemory
from .queue import DescriptorChain, SplitQueue, write_buffers

log = logging.getLogger(__name__)

NUM_BUFFERS_OFFSET: Final = 10  # virtio_net_hdr_mrg_rxbuf.num_buffers


def take_buffers(queue: SplitQueue, memory: GuestMemory, held: deque[DescriptorChain], views: list[memoryview],
                 count: int, covered: int, want: int, max_pieces: int, least: int) -> tuple[int, int]:
    """Views of the writable pieces of the chains in `held`, in order, the first `count` of which
    (`covered` bytes) have theirs in `views` already: further held chains, then chains popped
    from `queue` (appended to `held`), until `want` bytes are covered, the queue is empty, or
    a chain would take `views` past `max_pieces`. A popped chain with fewer than `least`
    writable bytes or more than `max_pieces` pieces goes back to the driver empty. Returns the
    new (count, covered)."""
    while covered < want:
        if count < len(held):
            chain = held[count]
        else:
            popped = queue.pop()
            if popped is None:
                break
            if popped.writable_length < least or len(popped.writable) > max_pieces:
                log.debug("RX buffer of %d bytes in %d pieces is unusable", popped.writable_length,
                          len(popped.writable))
                queue.push(popped, 0)
                continue
            held.append(popped)
            chain = popped
        writable = chain.writable
        if count and len(views) + len(writable) > max_pieces:
            break
        for address, length in writable:
            views.append(memory.view(address, length))
        covered += chain.writable_length
        count += 1
    return count, covered


def return_filled(queue: SplitQueue, memory: GuestMemory, held: deque[DescriptorChain], n: int) -> tuple[int, int, int]:
    """A frame of `n` bytes lies in the first chains of `held` (they cover it): take those off,
    write how many they are into the frame's header (num_buffers, which the TAP leaves out),
    and return them to the driver together. Returns (chains, pieces, bytes those chains cover)."""
    chain = held.popleft()
    covered, pieces = chain.writable_length, len(chain.writable)
    used = [(chain, min(n, covered))]
    while covered < n:
        chain = held.popleft()
        used.append((chain, min(n - covered, chain.writable_length)))
        covered += chain.writable_length
        pieces += len(chain.writable)
    set_num_buffers(memory, used[0][0], len(used))
    queue.push_many(used)
    return len(used), pieces, covered


def set_num_buffers(memory: GuestMemory, chain: DescriptorChain, count: int) -> None:
    """The header's num_buffers: how many buffers the frame took."""
    address, length = chain.writable[0]
    if length >= NUM_BUFFERS_OFFSET + 2:
        memory.write_u16(address + NUM_BUFFERS_OFFSET, count)
    else:  # a header split over buffers
        write_buffers(memory, chain.writable, struct.pack("<H", count), NUM_BUFFERS_OFFSET)
