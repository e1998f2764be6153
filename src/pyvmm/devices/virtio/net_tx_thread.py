"""virtio-net's transmit queue lent to a C thread that sends without the GIL (net_transmitter.c).

Why: on the software CPU a transmit kick was served on the vCPU thread that made it
(inline_kicks.py), and each frame's write to the TAP ran the host's network stack there: under
`iperf3 -R` the guest's ACKs, inside whose writes the host sent its next segments, were about a
tenth of the VM's shared host CPU (host/cpu_affinity.py), and the frames the guest added after
a slice's first kick waited for the slice's end. The thread runs off that CPU, sends each
frame as it comes, and tells the I/O thread only when the driver wants an interrupt.

TxThread is one active queue's: made when the device lends the queue out (net.py), closed at
reset. While lent, the queue's rings are the thread's: Python only kicks it and takes
reports (counters, the used index). stop() hands the ring indices back exactly; the thread
never holds a request across a stop (each frame is sent and returned in one go). It stops by
itself at anything it does not serve (net_transmitter.c lists them): the Python path serves that.

Off by default: PYVMM_NET_TX_THREAD=1 turns it on (where the compiled group is built). Measured
on the software CPU (README, fourteenth round), it made `iperf3 -R` (host -> guest) faster but
guest -> host streams slower, busybox nc's 1 KiB writes much slower (sent at once, it seems,
they no longer gather into one segment as they do when they leave at the slice's end), so the
default stays the kick's own thread until that is understood.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ...compiled import c_module
from ...memory.guest_memory import GuestMemory
from .queue import SplitQueue
from .ring_threads import Report, allowed

log = logging.getLogger(__name__)

ENV = "PYVMM_NET_TX_THREAD"
C_MODULE = "pyvmm.devices.virtio.net_transmitter"


def available(environ=os.environ) -> bool:
    """Whether NICs lend their transmit queue to a thread: the C module is built, and asked for
    (PYVMM_NET_TX_THREAD=1; off by default, see the module's doc)."""
    return allowed(ENV, C_MODULE, "frames sent by a thread of their own", "where the kick is served",
                   default=False, environ=environ)


def built() -> bool:
    """Whether the C module is built (whatever the switch says)."""
    return c_module(C_MODULE) is not None


class TxThread:
    def __init__(self, fd: int, memory: GuestMemory, queue: SplitQueue, *, header: int, max_frame: int,
                 max_pieces: int, threaded: bool = True) -> None:
        module = c_module(C_MODULE)
        if module is None:
            raise RuntimeError("net transmit thread: the compiled group is not in use")
        self.queue = queue
        regions = tuple((int(region.guest_base), region.view) for region in memory.regions)
        self._transmitter: Any = module.Transmitter(fd, regions, queue.desc_table, queue.avail_ring, queue.used_ring,
                                                    queue.size, queue.event_idx, queue.indirect, header, max_frame,
                                                    max_pieces, threaded)
        self.serving = False

    @property
    def fd(self) -> int:
        """An eventfd: readable when there is a report to take."""
        return int(self._transmitter.fd)

    def start(self) -> bool:
        """Lend the queue; False where it has requests in flight (restored ones): nothing lent."""
        try:
            last_avail, used_idx = self.queue.lend([])
        except ValueError:
            return False
        self._transmitter.start(last_avail, used_idx, self.queue.signalled_used)
        self.serving = True
        return True

    def kick(self) -> None:
        self._transmitter.kick()

    def take(self) -> Report:
        """The thread's report: the queue's used index and completions, counters returned."""
        chains, frames, length, dropped, used_idx, stopped = self._transmitter.take()
        if chains:
            self.queue.note_used(used_idx, chains)
        return Report(frames, length, dropped, stopped)

    def stop(self) -> Report:
        """Take the queue back: the thread stops; returns its last report."""
        last_avail, used_idx = self._transmitter.stop()
        report = self.take()
        self.serving = False
        self.queue.take_back(last_avail, used_idx, [])
        return report

    def pump(self) -> None:
        """Without a thread (threaded=False): serve until it would wait."""
        self._transmitter.pump()

    def close(self) -> None:
        """Stop the thread (after stop(): nothing is lent) and let guest RAM go."""
        self._transmitter.close()

    def close_fd(self) -> None:
        """Close the report eventfd: on the I/O thread, once it stopped watching it (close()
        leaves it open, since the I/O thread may be about to read it)."""
        self._transmitter.close_fd()
