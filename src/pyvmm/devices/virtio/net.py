"""virtio-net (virtio 1.2 section 5.1): one receive and one transmit queue over a frame back-end.

The back-end (a TAP, see pyvmm/net/tap.py, or any fd that carries one frame per read and
write) puts the 12-byte `struct virtio_net_hdr_v1` in front of every frame, the layout a
VERSION_1 driver uses, so headers pass through in both directions untouched; only
num_buffers, which the TAP skips, is written by the device.

TX: each chain's readable part (header + frame) is gathered into one writev. A back-end
that cannot take a frame right now (EAGAIN; a TAP practically never does) makes the device
drop it and count it in tx_dropped: retrying would need a writability watch on the I/O thread.
That write never waits, so on the software CPU a transmit kick is served on the vCPU thread
that made it (`quick_queues`, inline_kicks.py): the frames there leave at once, those the guest
adds later in its slice (no kick asked for) and the transmit interrupt at the slice's end.
With PYVMM_NET_TX_THREAD=1 (off by default: net_tx_thread.py says why), where the compiled
group is built, the transmit queue is lent, after the first kick, to a thread of its own while the link is up and no TX rate limit is
set (net_tx_thread.py: why): it sends each frame as it comes, in C without the GIL, off the
VM's shared CPU, and the I/O thread interrupts the guest when the driver asks for it. A kick
then only wakes the thread. The queue is taken back as the receive queue is (below).

RX: while the device is active the I/O thread watches the back-end fd. On readable, frames
are read straight into the guest's buffers (readv, header included) until the back-end is
empty or the guest has no buffers left. Then the device stops watching the fd (no busy loop
on a readable fd nobody can drain) until the guest kicks the receive queue. A frame larger
than the guest's buffer is dropped and counted (rx_dropped); with MRG_RXBUF it spans as
many buffers as it needs and num_buffers says how many: the readv covers as many of the
guest's buffers as a largest frame would fill (16 of Linux's 4 KiB ones for a 64 KiB TSO
frame), the frame takes those it filled, published with one used-index store, and the rest
wait for the next frame. Only when the guest has posted too few does the tail go through a
scratch buffer and wait for more.

Where the compiled group is built (and PYVMM_NET_RX_THREAD is not 0), the receive queue is
lent to a thread of its own while the guest uses mergeable buffers, no RX rate limit is set
and the link is up (net_rx_thread.py: why): it does what the paragraph above says in C,
without the GIL, and the I/O thread takes its reports and interrupts the guest. The device
takes the queue back, exactly, to pause, save, reset, limit or unplug, and whenever the thread
meets what it does not serve; the I/O thread then serves as above.

Offloads (checksum, TSO, UFO) are offered only as far as the back-end accepts them; at
DRIVER_OK the back-end is told which ones the guest accepts on receive.

Rate limits (bytes/s and packets/s, each direction; devices/rate_limiter.py): a frame to send
that may not go yet stays in the ring; receiving stops (the back-end is not read, the host
queues or drops as a wire would) while the RX limit has no token, and a received frame is
charged once its length is known. Both resume when their refill timer fires (throttle.py).
"""

from __future__ import annotations

import collections
import functools
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

from ...iothread import IoThread
from ...memory.guest_memory import GuestMemory, GuestMemoryError
from ...persist import State, require
from ..rate_limiter import Clock, RateLimit, RateLimiterState, Timers
from .device import VIRTIO_ID_NET, VirtioDevice, VirtioDeviceState, VirtioInterrupt
from . import net_rx_thread, net_tx_thread
from .net_rx import return_filled, set_num_buffers, take_buffers
from .net_rx_thread import RxThread
from .net_tx_thread import TxThread
from .queue import DescriptorChain, SplitQueue, VirtqueueBroken, buffer_views, write_buffers
from .ring_threads import Report
from .throttle import Throttle

log = logging.getLogger(__name__)

# Feature bits (section 5.1.3)
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_GUEST_UFO = 1 << 10
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_HOST_UFO = 1 << 14
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16

VIRTIO_NET_S_LINK_UP = 1

# Back-end offload bits: the values of Linux's TUN_F_* so a TAP takes them as they are
OFFLOAD_CSUM = 0x01
OFFLOAD_TSO4 = 0x02
OFFLOAD_TSO6 = 0x04
OFFLOAD_TSO_ECN = 0x08
OFFLOAD_UFO = 0x10

RX_QUEUE, TX_QUEUE = 0, 1
NET_HDR_SIZE = 12          # struct virtio_net_hdr_v1 (VERSION_1 always has num_buffers)
MAX_FRAME = 65535 + 18     # the largest (GSO) frame a TAP passes: 64 KiB IP packet + Ethernet/VLAN header
RX_SCRATCH = NET_HDR_SIZE + MAX_FRAME + 1  # room past the guest buffer: a longer read means "too big"
MAX_SEGMENTS = 1023        # iovecs per readv/writev (IOV_MAX is 1024; one is kept for the scratch)
RX_BATCH = 256             # frames per wake-up, so one busy NIC does not starve the I/O thread's other fds
MAC_LEN = 6


class NetBackend(Protocol):
    """Frames with a 12-byte virtio-net header in front, one per read or write, never blocking."""

    def fileno(self) -> int: ...

    def readv(self, buffers: list) -> int:
        """Read one frame into the buffers; returns its length (a TAP gives the full length even when
        the buffers were too small), 0 at end of file. Raises BlockingIOError when there is none."""

    def writev(self, buffers: list) -> int:
        """Write one frame gathered from the buffers; raises BlockingIOError when it cannot now."""

    def supported_offloads(self) -> int:
        """OFFLOAD_* bits the back-end can deliver to a guest that accepts them."""

    def set_offloads(self, flags: int) -> None:
        """The OFFLOAD_* bits the guest accepts on receive."""


@dataclass
class _PartialFrame:
    """A frame bigger than one buffer (MRG_RXBUF), waiting for more buffers from the guest."""

    used: list[tuple[DescriptorChain, int]]
    rest: bytes
    length: int                 # header + frame
    placed: int = field(default=0)  # bytes of `rest` already in guest buffers


class VirtioNet(VirtioDevice):
    device_id = VIRTIO_ID_NET
    name = "virtio-net"
    # a frame written to a non-blocking back-end, or new receive buffers noted (the receiving
    # stays on the I/O thread, where the back-end's readability is watched)
    quick_queues = True

    def __init__(self, backend: NetBackend, *, mac: bytes, iothread: IoThread, queue_size: int = 256,
                 mtu: int | None = None, rx_rate_limit: RateLimit | None = None,
                 tx_rate_limit: RateLimit | None = None, timers: Timers | None = None,
                 clock: Clock = time.monotonic_ns, rx_thread: bool | None = None,
                 tx_thread: bool | None = None) -> None:
        if len(mac) != MAC_LEN or mac[0] & 1:
            raise ValueError(f"MAC {mac.hex(':')} is not a 6-byte unicast address")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} is outside 68..65535")
        features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF
        if mtu is not None:
            features |= VIRTIO_NET_F_MTU
        features |= _offload_features(backend.supported_offloads())
        super().__init__((queue_size, queue_size), features)
        self.backend = backend
        self.iothread = iothread
        self.mac = bytes(mac)
        self.mtu = mtu
        self.link_up = True
        self.rx_watching = False    # does the device want to hear when the back-end is readable?
        self._rx_registered: int | None = None  # the fd registered with the I/O thread (I/O thread only)
        self._rx_spare: collections.deque[DescriptorChain] = collections.deque()  # popped, not used yet
        self._rx_partial: _PartialFrame | None = None
        # Views of the first _rx_viewed spare buffers, in order (the readv's iovecs), kept from
        # one wake-up to the next; dropped whenever spare changes elsewhere and before RAM closes.
        self._rx_views: list[memoryview] = []
        self._rx_viewed = 0
        self._rx_viewed_bytes = 0
        self._scratch = bytearray(RX_SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        self.counters = dict.fromkeys(("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes",
                                       "tx_dropped"), 0)
        timers = iothread if timers is None else timers  # refill timers run on the I/O thread
        self.rx_throttle = Throttle(self.lock, self._resume_rx, timers, rx_rate_limit, clock)
        self.tx_throttle = Throttle(self.lock, self._transmit_if_usable, timers, tx_rate_limit, clock)
        # The receive queue's own thread (net_rx_thread.py), made at the first lend, closed at reset.
        self.rx_thread_wanted = net_rx_thread.available() if rx_thread is None else rx_thread
        self._rx_thread: RxThread | None = None
        self.rx_thread_stops: dict[str, int] = {}  # why the thread gave the queue back, how often
        self.rx_thread_frames = 0                  # of rx_packets, those the thread received
        # The transmit queue's own thread (net_tx_thread.py), likewise.
        self.tx_thread_wanted = net_tx_thread.available() if tx_thread is None else tx_thread
        self._tx_thread: TxThread | None = None
        self.tx_thread_stops: dict[str, int] = {}
        self.tx_thread_frames = 0                  # of tx_packets, those the thread sent

    # --- configuration (section 5.1.4) ----------------------------------------------------------------

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        # mac, status, max_virtqueue_pairs, mtu
        return struct.pack("<6sHHH", self.mac, status, 1, self.mtu or 0)

    def set_link(self, up: bool) -> None:
        """Plug or unplug the virtual cable: the driver sees the status change through a config interrupt."""
        with self.lock:
            if up == self.link_up:
                return
            self.link_up = up
            active = self.active
            if not up:
                self._take_back_rx()  # frames are dropped on the I/O thread, as on a wire
                self._take_back_tx()
            if self.queue_usable(RX_QUEUE):
                self.iothread.call_soon(self._rx_ready)  # (lent again when the link is up)
        if active:
            self.config_changed()

    def stats(self) -> dict[str, int]:
        with self.lock:
            if self._take_rx_report():  # (the counters as of now; the I/O thread interrupts)
                self.iothread.call_soon(functools.partial(self._rx_ready, lend=False))
            self._take_tx_report()
            return {**self.counters, "rx_throttled": self.rx_throttle.deferrals,
                    "tx_throttled": self.tx_throttle.deferrals, "rx_thread_frames": self.rx_thread_frames,
                    "rx_thread_handbacks": sum(self.rx_thread_stops.values()),
                    "tx_thread_frames": self.tx_thread_frames,
                    "tx_thread_handbacks": sum(self.tx_thread_stops.values())}

    def set_rate_limits(self, rx: RateLimit | None, tx: RateLimit | None) -> None:
        """Change both directions' limits while running (buckets start full); None removes one."""
        # (all under the lock: a kick between the take-back and the new limit would lend again)
        with self.lock:
            if rx is not None and not rx.unlimited:
                self._take_back_rx()  # the I/O thread charges each frame
            if tx is not None and not tx.unlimited:
                self._take_back_tx()  # (served and charged in Python; lent again without a limit)
            self.rx_throttle.set_limit(rx)
            self.tx_throttle.set_limit(tx)
            if self.queue_usable(RX_QUEUE):
                self.iothread.call_soon(self._rx_ready)  # (lent again without an RX limit)

    # --- lifecycle -------------------------------------------------------------------------------------

    def on_activate(self) -> None:
        accepted = 0
        if self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            accepted |= OFFLOAD_CSUM
            for feature, flag in ((VIRTIO_NET_F_GUEST_TSO4, OFFLOAD_TSO4), (VIRTIO_NET_F_GUEST_TSO6, OFFLOAD_TSO6),
                                  (VIRTIO_NET_F_GUEST_ECN, OFFLOAD_TSO_ECN), (VIRTIO_NET_F_GUEST_UFO, OFFLOAD_UFO)):
                if self.has_feature(feature):
                    accepted |= flag
        self._set_offloads(accepted)
        if self.queues[RX_QUEUE].ready:
            self._watch_rx()
            if self._may_lend_rx():  # (a restored device's buffers in flight need no kick)
                self.iothread.call_soon(self._rx_ready)

    def attach(self, memory: GuestMemory, interrupt: VirtioInterrupt) -> None:
        super().attach(memory, interrupt)
        if self._release_rx_views not in memory.on_close:
            memory.on_close.append(self._release_rx_views)  # views of RAM would keep it from closing

    def _release_rx_views(self) -> None:
        with self.lock:
            self._close_rx_thread()
            self._close_tx_thread()
            self._forget_rx_views()

    def _forget_rx_views(self) -> None:
        self._rx_views = []
        self._rx_viewed = self._rx_viewed_bytes = 0

    def on_reset(self) -> None:
        self._close_rx_thread()
        self._close_tx_thread()
        self.rx_throttle.cancel()
        self.tx_throttle.cancel()
        self._unwatch_rx()
        self._rx_spare.clear()
        self._forget_rx_views()
        self._rx_partial = None
        self._set_offloads(0)

    def fail(self, reason: str) -> None:
        with self.lock:
            self._take_back_rx()
            self._take_back_tx()
            self._unwatch_rx()  # a readable fd nobody drains would spin the I/O thread
        super().fail(reason)

    def _set_offloads(self, flags: int) -> None:
        try:
            self.backend.set_offloads(flags)
        except OSError as exc:
            log.warning("%s: back-end refused offloads %#x: %s", self.name, flags, exc.strerror)

    # The wish (rx_watching) changes under the device lock on any thread; the selector is only
    # touched on the I/O thread, which compares the wish with what it registered. So a stale
    # readable event racing a reset and a re-activation can never register the fd twice.
    def _watch_rx(self) -> None:
        if not self.rx_watching:
            self.rx_watching = True
            self.iothread.call_soon(self._apply_rx_watch)

    def _unwatch_rx(self) -> None:
        if self.rx_watching:
            self.rx_watching = False
            self.iothread.call_soon(self._apply_rx_watch)

    def _apply_rx_watch(self) -> None:
        with self.lock:
            want = self.rx_watching
        if want and self._rx_registered is None:
            self._rx_registered = self.backend.fileno()
            self.iothread.add_reader(self._rx_registered, self._rx_ready)
        elif not want and self._rx_registered is not None:
            self.iothread.remove_reader(self._rx_registered)  # the fd it was, even if the back-end closed it
            self._rx_registered = None

    # --- queues ------------------------------------------------------------------------------------------

    def process_queue(self, queue_index: int) -> None:
        if queue_index == TX_QUEUE:
            self._transmit()
        elif queue_index == RX_QUEUE:
            # new receive buffers: for the receive thread, or watch the back-end again; a
            # half-placed frame needs no new data to go on, so it is finished on the I/O thread
            # right away, where the queue is lent if it can be
            if self.rx_throttle.blocked:
                return  # the refill timer watches again
            if (thread := self._lent_rx_thread()) is not None:
                thread.kick()
                return
            self._watch_rx()
            if self._rx_partial is not None or self._may_lend_rx():
                self.iothread.call_soon(self._rx_ready)

    def _transmit_if_usable(self) -> None:
        if self.queue_usable(TX_QUEUE):
            self.notify(TX_QUEUE)

    def _transmit(self) -> None:
        # Lent to the transmit thread: it sends. Else what is there is sent here, and the queue
        # lent where it may be, for what comes next.
        if (thread := self._lent_tx_thread()) is not None:
            thread.kick()
            return
        # Frames the guest adds while this runs come without a kick; served in place, until the
        # slice ends (kicks held): then they leave together, as when the I/O thread took a batch.
        # (Served in place with a kick per frame, busybox nc's 1 KiB writes took 3x the
        # interrupts per KiB and ran at a third of the speed in 2 of 3 A/B pairs.)
        self.serve_without_kicks(TX_QUEUE, functools.partial(self._send_available, self.queues[TX_QUEUE]),
                                 lambda: self.tx_throttle.blocked)
        self._lend_tx()

    def serve_in_place(self, queue_index: int) -> bool:
        # A kick for the transmit thread: wake it (lending it the queue after sending what is
        # there). It asks for kicks and interrupts itself, the latter for what was sent here too
        # (none is raised from inside the guest's kick: inline_kicks.py).
        if queue_index != TX_QUEUE or not self._may_lend_tx():
            return super().serve_in_place(queue_index)
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self._serving_in_place = True
            self.notify(TX_QUEUE)
            if self._lent_tx_thread() is None:  # (no thread after all: as any kick served in place)
                self._held_queues.add(TX_QUEUE)
        finally:
            self._serving_in_place = False
            self.lock.release()
        return True

    # --- the transmit thread (net_tx_thread.py) ----------------------------------------------------------

    def _lent_tx_thread(self) -> TxThread | None:
        thread = self._tx_thread
        return thread if thread is not None and thread.serving else None

    def _may_lend_tx(self) -> bool:
        return (self.tx_thread_wanted and self.link_up and self.tx_throttle.limiter is None
                and self.queue_usable(TX_QUEUE))

    def _lend_tx(self) -> bool:
        """Lend the transmit queue to its thread where it may be (lock held)."""
        if not self._may_lend_tx() or self._lent_tx_thread() is not None:
            return False
        queue = self.queues[TX_QUEUE]
        if self._tx_thread is None:
            try:
                self._tx_thread = TxThread(self.backend.fileno(), self.memory, queue, header=NET_HDR_SIZE,
                                           max_frame=MAX_FRAME, max_pieces=MAX_SEGMENTS)
            except (ValueError, OSError, RuntimeError) as exc:
                log.warning("%s: no transmit thread, frames are sent where the kick is served: %s", self.name, exc)
                self.tx_thread_wanted = False
                return False
            self.iothread.add_eventfd(self._tx_thread.fd, self._tx_thread_report)
            # (at the resume, the I/O thread runs the serve the take-back queued: lent again there)
            self.iothread.hold_with(self._tx_thread, self._pause_tx_thread, _nothing)
        if not self._tx_thread.start():
            return False
        self._tx_thread.kick()  # (it looks at the ring: what the driver added meanwhile is sent)
        return True

    def _tx_thread_report(self) -> None:
        """On the I/O thread: the driver wants an interrupt for frames sent, or the thread gave
        the queue back (served here then, and lent again)."""
        with self.lock:
            if not self._take_tx_report() and self.queue_usable(TX_QUEUE):  # (taken back: served soon)
                self.signal_used(TX_QUEUE)

    def _take_tx_report(self) -> bool:
        """Count what the transmit thread did; True where it gave the queue back (lock held)."""
        thread = self._lent_tx_thread()
        if thread is None:
            return False
        report = thread.take()
        self._count_tx_report(report)
        if report.stopped is None:
            return False
        self._take_back_tx()
        return True

    def _count_tx_report(self, report: Report) -> None:
        """The counters, and why the thread gave the queue back where it did by itself (also
        when that report comes with a take-back)."""
        self.tx_thread_frames += report.frames
        self.counters["tx_packets"] += report.frames
        self.counters["tx_bytes"] += report.bytes
        self.counters["tx_dropped"] += report.dropped
        if report.stopped is not None:
            self.tx_thread_stops[report.stopped] = self.tx_thread_stops.get(report.stopped, 0) + 1
            log.debug("%s: the transmit thread gave the queue back: %s", self.name, report.stopped)

    def _take_back_tx(self) -> bool:
        """The transmit queue is Python's again (lock held); False where it was not lent. What
        the thread left in the ring is served on the I/O thread (it is lent again there where
        it may be): the driver, having passed the kick the thread last asked for, sends none."""
        thread = self._lent_tx_thread()
        if thread is None:
            return False
        self._count_tx_report(thread.stop())
        if self.queue_usable(TX_QUEUE):
            self.iothread.call_soon(self._transmit_if_usable)
        return True

    def _close_tx_thread(self) -> None:
        self._take_back_tx()
        thread, self._tx_thread = self._tx_thread, None
        if thread is not None:
            self._retire(thread)

    def _retire(self, thread: RxThread | TxThread) -> None:
        """A ring thread closed for good: the I/O thread no longer holds it with itself nor
        hears it; its report eventfd is closed there, after the I/O thread stopped watching it
        (it may be reading it now)."""
        self.iothread.forget_helper(thread)
        thread.close()
        self.iothread.remove_reader(thread.fd)
        self.iothread.call_soon(thread.close_fd)

    def _pause_tx_thread(self) -> None:
        """The I/O thread holds still: so does the transmit thread (the queue is taken back)."""
        with self.lock:
            self._take_back_tx()

    def _send_available(self, queue: SplitQueue) -> bool:
        """Send the frames the guest made available (until a rate limit stops it): all of them."""
        while not self.tx_throttle.blocked and (chain := queue.pop()) is not None:
            length = chain.readable_length
            valid = self.link_up and NET_HDR_SIZE <= length <= NET_HDR_SIZE + MAX_FRAME \
                and len(chain.readable) <= MAX_SEGMENTS
            # a frame that is dropped costs a packet, not its (guest-claimed) bytes
            if not self.tx_throttle.admit(length - NET_HDR_SIZE if valid else 0):
                queue.undo_pop(chain)  # sent when the refill timer fires
                break
            if not valid:
                self.counters["tx_dropped"] += 1
            else:
                try:
                    self.backend.writev(buffer_views(self.memory, chain.readable))
                    self.counters["tx_packets"] += 1
                    self.counters["tx_bytes"] += length - NET_HDR_SIZE
                except OSError as exc:  # EAGAIN, or a header the back-end rejects (EINVAL)
                    self.counters["tx_dropped"] += 1
                    log.debug("%s: TX frame dropped: %s", self.name, exc.strerror)
            queue.push(chain, 0)
        return True

    def _resume_rx(self) -> None:
        """The RX refill timer fired (device lock held): take frames again."""
        if self.queue_usable(RX_QUEUE):
            self._watch_rx()
            self.iothread.call_soon(self._rx_ready)

    def _rx_ready(self, lend: bool = True) -> None:
        """On the I/O thread: the back-end is readable, or a partial frame may go on, or the
        queue may be lent to its thread (`lend`)."""
        with self.lock:
            if not self.queue_usable(RX_QUEUE):
                # a driver may set DRIVER_OK without enabling the receive queue: nothing to fill
                self._unwatch_rx()
                return
            if self._lent_rx_thread() is not None:
                return
            try:
                if lend and self._lend_rx():
                    return
                self._watch_rx()  # (the I/O thread receives: it stops watching when it must wait)
                self._receive()
            except (VirtqueueBroken, GuestMemoryError) as exc:
                self.fail(str(exc))
                return
            self.signal_used(RX_QUEUE)

    # --- the receive thread (net_rx_thread.py) -----------------------------------------------------------

    def _lent_rx_thread(self) -> RxThread | None:
        """The receive thread the queue is lent to, or None."""
        thread = self._rx_thread
        return thread if thread is not None and thread.serving else None

    def _may_lend_rx(self) -> bool:
        return (self.rx_thread_wanted and self._rx_partial is None and self.link_up and self.rx_throttle.limiter is None
                and self.has_feature(VIRTIO_NET_F_MRG_RXBUF) and self.queue_usable(RX_QUEUE))

    def _lend_rx(self) -> bool:
        """Lend the receive queue to its thread where it may be (lock held, on the I/O thread)."""
        if not self._may_lend_rx():
            return False
        queue, spare = self.queues[RX_QUEUE], self._rx_spare
        while queue.redoing:  # requests in flight at a save, taken again first: held by the thread
            take_buffers(queue, self.memory, spare, [], len(spare), 0, 1, MAX_SEGMENTS, NET_HDR_SIZE)
        if self._rx_thread is None:
            try:
                self._rx_thread = RxThread(self.backend.fileno(), self.memory, queue, header=NET_HDR_SIZE,
                                           want=NET_HDR_SIZE + MAX_FRAME, max_pieces=MAX_SEGMENTS)
            except (ValueError, OSError, RuntimeError) as exc:
                log.warning("%s: no receive thread, frames are received on the I/O thread: %s", self.name, exc)
                self.rx_thread_wanted = False
                return False
            self.iothread.add_eventfd(self._rx_thread.fd, self._rx_thread_report)
            self.iothread.hold_with(self._rx_thread, self._pause_rx_thread, self._resume_rx_thread)
        self._forget_rx_views()
        if not self._rx_thread.start(spare):
            return False
        self._unwatch_rx()
        return True

    def _rx_thread_report(self) -> None:
        """On the I/O thread: the receive thread published frames, or gave the queue back."""
        with self.lock:
            stopped = self._take_rx_report()
            if not stopped and self.queue_usable(RX_QUEUE):
                self.signal_used(RX_QUEUE)
        if stopped:
            self._rx_ready(lend=False)

    def _take_rx_report(self) -> bool:
        """Count what the receive thread did; True where it gave the queue back, which is then
        the I/O thread's to serve (it is lent again at a kick). Lock held."""
        thread = self._lent_rx_thread()
        if thread is None:
            return False  # taken back meanwhile, with its report
        report = thread.take()
        self._count_rx_report(report)
        if report.stopped is None:
            return False
        self._take_back_rx()
        self._watch_rx()
        return True

    def _count_rx_report(self, report: Report) -> None:
        """As _count_tx_report."""
        self.rx_thread_frames += report.frames
        self.counters["rx_packets"] += report.frames
        self.counters["rx_bytes"] += report.bytes
        self.counters["rx_dropped"] += report.dropped
        if report.stopped is not None:
            self.rx_thread_stops[report.stopped] = self.rx_thread_stops.get(report.stopped, 0) + 1
            log.debug("%s: the receive thread gave the queue back: %s", self.name, report.stopped)

    def _take_back_rx(self) -> bool:
        """The receive queue is the I/O thread's again, with the chains the thread held (lock
        held); False where it was not lent."""
        thread = self._lent_rx_thread()
        if thread is None:
            return False
        spare = self._rx_spare
        report, partial = thread.stop(spare)
        self._count_rx_report(report)
        self._forget_rx_views()
        if partial is not None:  # placed here when the guest adds buffers
            used = [(chain, chain.writable_length) for chain in (spare.popleft() for _ in range(partial.chains))]
            self._rx_partial = _PartialFrame(used, partial.rest, partial.length)
        return True

    def _close_rx_thread(self) -> None:
        self._take_back_rx()
        thread, self._rx_thread = self._rx_thread, None
        if thread is not None:
            self._retire(thread)

    def stop_io_threads(self) -> None:
        """Before the back-end closes: the receive and transmit threads stop for good (frames go
        through the I/O thread and the kicks' threads)."""
        with self.lock:
            self.rx_thread_wanted = self.tx_thread_wanted = False
            self._close_rx_thread()
            self._close_tx_thread()

    def _pause_rx_thread(self) -> None:
        """The I/O thread holds still: so does the receive thread (the queue is taken back)."""
        with self.lock:
            self._take_back_rx()

    def _resume_rx_thread(self) -> None:
        # the frames published before the pause are signalled there, and the queue lent again
        self.iothread.call_soon(self._rx_ready)

    def _pop_rx_chain(self) -> DescriptorChain | None:
        """The guest's next usable receive buffer; unusable ones go back at once, empty."""
        held: collections.deque[DescriptorChain] = collections.deque()
        take_buffers(self.queues[RX_QUEUE], self.memory, held, [], 0, 0, 1, MAX_SEGMENTS, NET_HDR_SIZE)
        return held[0] if held else None

    def _next_rx_chain(self) -> DescriptorChain | None:
        return self._rx_spare.popleft() if self._rx_spare else self._pop_rx_chain()

    def _receive(self) -> None:
        """Read frames straight into the guest's buffers, one readv each. With MRG_RXBUF the readv
        spans as many buffers as a largest frame needs and the frame takes those it fills; the
        rest stay for the next frame, with their views."""
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        want = NET_HDR_SIZE + MAX_FRAME if mergeable else 1
        spare, memory = self._rx_spare, self.memory
        for _ in range(RX_BATCH):
            if self._rx_partial is not None:
                self._forget_rx_views()  # placing it takes spare buffers
                if not self._place_partial():
                    self._unwatch_rx()
                    return
            if not self.rx_throttle.ready():
                self._unwatch_rx()  # until the refill timer
                return
            views = self._rx_views
            count, covered = take_buffers(self.queues[RX_QUEUE], memory, spare, views, self._rx_viewed,
                                          self._rx_viewed_bytes, want, MAX_SEGMENTS, NET_HDR_SIZE)
            self._rx_viewed, self._rx_viewed_bytes = count, covered
            if not count:
                self._unwatch_rx()  # until the guest kicks the receive queue
                return
            try:
                n = self.backend.readv(views + [self._scratch_view])
            except BlockingIOError:
                return
            except OSError as exc:
                self._unwatch_rx()
                log.warning("%s: receive failed, RX stopped until the next kick: %s", self.name, exc.strerror)
                return
            if n == 0:  # the back-end went away (a closed socket peer)
                self._unwatch_rx()
                return
            if n < NET_HDR_SIZE or not self.link_up:
                self.counters["rx_dropped"] += 1
            elif n <= covered:
                self._complete_rx(n)
            elif mergeable and n < covered + RX_SCRATCH:  # the guest had too few buffers: wait for more
                used = [(chain, chain.writable_length) for chain in (spare.popleft() for _ in range(count))]
                self._forget_rx_views()
                self._rx_partial = _PartialFrame(used, bytes(self._scratch_view[:n - covered]), n)
            else:
                self.counters["rx_dropped"] += 1  # larger than the guest's buffer

    def _complete_rx(self, n: int) -> None:
        """A frame of n bytes lies in the first spare buffers: return those it filled."""
        used_count, segments, covered = return_filled(self.queues[RX_QUEUE], self.memory, self._rx_spare, n)
        del self._rx_views[:segments]
        self._rx_viewed -= used_count
        self._rx_viewed_bytes -= covered
        self._count_rx(n)

    def _place_partial(self) -> bool:
        """Spread the rest of a partial frame over more buffers; False while the guest has none."""
        partial = self._rx_partial
        assert partial is not None  # the callers checked
        queue = self.queues[RX_QUEUE]
        rest = memoryview(partial.rest)
        while partial.placed < len(rest):
            if len(partial.used) >= queue.size:
                # holding every buffer the ring can carry: the guest cannot post more, give up
                self._rx_spare.extendleft(chain for chain, _ in reversed(partial.used))
                self._rx_partial = None
                self.counters["rx_dropped"] += 1
                return True
            chain = self._next_rx_chain()
            if chain is None:
                return False
            done = write_buffers(self.memory, chain.writable, rest[partial.placed:])
            partial.used.append((chain, done))
            partial.placed += done
        set_num_buffers(self.memory, partial.used[0][0], len(partial.used))
        queue.push_many(partial.used)  # consecutive in the used ring, as num_buffers says
        self._rx_partial = None
        self._count_rx(partial.length)
        return True

    def _count_rx(self, length: int) -> None:
        self.counters["rx_packets"] += 1
        self.counters["rx_bytes"] += length - NET_HDR_SIZE
        self.rx_throttle.charge(length - NET_HDR_SIZE)

    # --- snapshot ---------------------------------------------------------------------------------------

    def save(self) -> NetState:
        """Receive buffers the device holds (popped, waiting for a frame) are the queue's requests
        in flight: the restored device takes them again first; a half-placed frame is lost, as on
        a wire."""
        with self.lock:
            if self._take_back_rx() and self.queue_usable(RX_QUEUE):
                self.iothread.call_soon(self._rx_ready)  # (a running VM's: lent again; a paused one's is back)
            self._take_back_tx()  # (lent again on the I/O thread)
            return NetState(virtio=self.save_virtio(), mac=self.mac, mtu=self.mtu, link_up=self.link_up,
                            counters=dict(self.counters), rx_rate_limiter=self.rx_throttle.save(),
                            tx_rate_limiter=self.tx_throttle.save())

    def check_restorable(self, state: State) -> None:
        state = require(state, NetState)
        if set(state.counters) != set(self.counters):
            state.fail("counters", f"names {sorted(state.counters)}, expected {sorted(self.counters)}")
        self.check_virtio(state.virtio)   # features: the offloads this back-end offers

    def restore(self, state: NetState) -> None:  # type: ignore[override]
        self.check_restorable(state)
        with self.lock:
            self._close_rx_thread()
            self._close_tx_thread()
            self._unwatch_rx()
            self._rx_spare.clear()
            self._forget_rx_views()
            self._rx_partial = None
            self.restore_virtio(state.virtio)
            self.mac = state.mac
            self.mtu = state.mtu
            self.link_up = state.link_up
            self.counters.update(state.counters)
            self.rx_throttle.restore(state.rx_rate_limiter, resume=False)
            self.tx_throttle.restore(state.tx_rate_limiter, resume=self.active)  # frames it held back
            if self.active:
                self.on_activate()


@dataclass(frozen=True)
class NetState(State):
    """The virtio state, the guest-visible configuration (MAC, MTU, link), the counters and
    (version 2) each direction's rate limit with its buckets' levels."""
    KIND = "virtio_net"
    VERSION = 2
    virtio: VirtioDeviceState
    mac: bytes
    mtu: int | None
    link_up: bool
    counters: dict[str, int]
    rx_rate_limiter: RateLimiterState | None = None
    tx_rate_limiter: RateLimiterState | None = None

    @classmethod
    def upgrade(cls, version: int, fields: dict) -> dict:
        if version == 1:
            return {**fields, "rx_rate_limiter": None, "tx_rate_limiter": None}
        return super().upgrade(version, fields)

    def validate(self) -> None:
        if len(self.mac) != MAC_LEN or self.mac[0] & 1:
            self.fail("mac", f"{self.mac.hex(':')} is not a 6-byte unicast address")
        if self.mtu is not None:
            self.check_range("mtu", 68, 65535)
        for name, value in self.counters.items():
            if value < 0:
                self.fail(f"counters[{name!r}]", f"{value} is negative")


def _nothing() -> None:
    pass


def _offload_features(offloads: int) -> int:
    """Checksum and segmentation offloads both ways, as far as the back-end handles them."""
    if not offloads & OFFLOAD_CSUM:
        return 0  # TSO and UFO need partial checksums
    features = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
    if offloads & OFFLOAD_TSO4:
        features |= VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_TSO4
    if offloads & OFFLOAD_TSO6:
        features |= VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_GUEST_TSO6
    if offloads & OFFLOAD_TSO_ECN and offloads & (OFFLOAD_TSO4 | OFFLOAD_TSO6):
        features |= VIRTIO_NET_F_HOST_ECN | VIRTIO_NET_F_GUEST_ECN
    if offloads & OFFLOAD_UFO:
        features |= VIRTIO_NET_F_HOST_UFO | VIRTIO_NET_F_GUEST_UFO
    return features
