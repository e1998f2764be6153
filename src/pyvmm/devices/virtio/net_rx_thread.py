"""virtio-net's receive queue lent to a C thread that fills it without the GIL (net_receiver.c).

Why: on the software CPU the VM's threads share one host CPU (host/cpu_affinity.py). Under
`iperf3 -R` the I/O thread's part of it, the back-end's reads and about 17 receive buffers per
64 KiB frame taken off the ring and returned in Python, was about a quarter, and the guest
stood idle half the time waiting for frames (benchmarks/guest_profile.py). The thread runs off
that CPU and tells the I/O thread once per burst what it published.

RxThread is one active queue's: made when the device lends the queue out (net.py), closed at
reset. While lent, the queue's rings are the thread's: Python only takes reports (counters,
the guest ranges written, the used index) and kicks it. stop() hands everything back exactly:
the ring indices, and the chains the thread holds become the device's spare buffers again, so
a save, a reset, a rate limit or a link change proceed as they always did. The thread stops by
itself at anything it does not serve (net_receiver.c lists them): the Python path serves that.

PYVMM_NET_RX_THREAD=0 turns it off (every frame read on the I/O thread); without the compiled
group it is off.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

from ...compiled import c_module
from ...memory.guest_memory import GuestMemory
from .queue import DescriptorChain, SplitQueue
from .ring_threads import Report, allowed

log = logging.getLogger(__name__)

ENV = "PYVMM_NET_RX_THREAD"
C_MODULE = "pyvmm.devices.virtio.net_receiver"


def available(environ=os.environ) -> bool:
    """Whether NICs lend their receive queue to a thread: the C module is built, and allowed."""
    return allowed(ENV, C_MODULE, "frames received on a thread of their own", "on the I/O thread", environ=environ)


@dataclass
class Partial:
    """A frame longer than the buffers the thread held: it fills the first `chains` of them,
    `rest` (its tail) waits for more."""
    chains: int
    rest: bytes
    length: int


class RxThread:
    def __init__(self, fd: int, memory: GuestMemory, queue: SplitQueue, *, header: int, want: int,
                 max_pieces: int, threaded: bool = True) -> None:
        module = c_module(C_MODULE)
        if module is None:
            raise RuntimeError("net receive thread: the compiled group is not in use")
        self.memory, self.queue = memory, queue
        regions = tuple((int(region.guest_base), region.view) for region in memory.regions)
        self._receiver: Any = module.Receiver(fd, regions, queue.desc_table, queue.avail_ring, queue.used_ring,
                                              queue.size, queue.event_idx, header, want, max_pieces, threaded)
        self.serving = False

    @property
    def fd(self) -> int:
        """An eventfd: readable when there is a report to take."""
        return int(self._receiver.fd)

    @property
    def holding(self) -> int:
        """Chains the thread holds for the next frames now (a glimpse: it moves on meanwhile)."""
        return int(self._receiver.holding)

    def start(self, held: deque[DescriptorChain]) -> bool:
        """Lend the queue, with the chains in `held` (all it has in flight, given over: `held`
        ends empty). False where the thread cannot take them (too many pieces): nothing lent."""
        heads = [chain.head for chain in held]
        last_avail, used_idx = self.queue.lend(heads)
        try:
            self._receiver.start(last_avail, used_idx, [(chain.head, chain.writable) for chain in held])
        except ValueError as exc:
            log.debug("net receive thread: not started: %s", exc)
            return False
        held.clear()
        self.serving = True
        return True

    def kick(self) -> None:
        self._receiver.kick()

    def take(self) -> Report:
        """The thread's report: the queue's used index and completions, the guest's written
        ranges noted (code translated from them dropped, dirty pages), counters returned."""
        chains, frames, length, dropped, used_idx, runs, stopped = self._receiver.take()
        if chains:
            self.queue.note_used(used_idx, chains)
        note = self.memory.on_device_writes
        if runs and note is not None:
            note(runs)
        return Report(frames, length, dropped, stopped)

    def stop(self, held: deque[DescriptorChain]) -> tuple[Report, Partial | None]:
        """Take the queue back: the thread stops, the chains it holds are appended to `held`, in
        order; returns its last report, and the frame it read past the buffers it held, if any."""
        last_avail, used_idx, chains, partial = self._receiver.stop()
        report = self.take()
        self.serving = False
        self.queue.take_back(last_avail, used_idx, [head for head, _ in chains])
        for head, pieces in chains:
            chain = DescriptorChain(head)
            chain.writable = list(pieces)
            chain.writable_length = sum(length for _, length in pieces)
            held.append(chain)
        return report, None if partial is None else Partial(*partial)

    def pump(self) -> None:
        """Without a thread (threaded=False): serve until it would wait."""
        self._receiver.pump()

    def close(self) -> None:
        """Stop the thread (after stop(): nothing is lent) and let guest RAM go."""
        self._receiver.close()

    def close_fd(self) -> None:
        """Close the report eventfd: on the I/O thread, once it stopped watching it (close()
        leaves it open, since the I/O thread may be about to read it)."""
        self._receiver.close_fd()
