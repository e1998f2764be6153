"""virtio-vsock (virtio 1.2 section 5.10): guest stream sockets mapped to host Unix sockets.

The device sees its host side only through the VsockHost protocol (host_side.py); pyvmm's
is host/vsock.py, Firecracker's Unix-socket convention, so its tools work unchanged:

- the guest connects to (CID 2, port P): the device asks the host side for a stream to P
  and answers RESPONSE, or RST when nobody serves P;
- a host program asks for guest port P: the device sends the guest a REQUEST from a fresh
  local port L to its port P and, once the guest accepts (RESPONSE), the program is told L;
  from then on bytes flow both ways.

Flow control is credit based (5.10.6.3). Every packet carries the sender's buf_alloc and
fwd_cnt; pyvmm never sends more payload than the guest's buf_alloc - (tx_cnt - fwd_cnt),
and it counts guest bytes as forwarded only once the host socket took them, so a guest
that honours the credit we advertise can never make us hold more than CONN_BUF_ALLOC
per connection (one that does not is reset).

Queues: 0 receive (device -> driver), 1 transmit, 2 event.

Snapshots: the state holds the connection table as the guest knows it (ports, credit in both
directions, bytes waiting either way, shutdowns, control packets not yet delivered). A host
stream cannot be saved: a device restored in the same process takes over the streams its
host side still has (the old device's `detach_host()`, then the same host object for the new
one); every connection whose host stream is gone is reset with an RST to the guest, which
sees the peer close that connection and nothing else.
"""

from __future__ import annotations

import collections
import logging
import os
import struct

from ...errors import UserError
from ...persist import State, require
from .device import VIRTIO_ID_VSOCK, VirtioDevice
from .host_side import HostStream, VsockHost
from .vsock_state import ReplyState, VsockState, connection_fields, saved_connection
from .queue import DescriptorChain, read_buffers, write_buffers

log = logging.getLogger(__name__)

VHOST_VSOCK_PATH = "/dev/vhost-vsock"

HOST_CID = 2
TYPE_STREAM = 1
OP_INVALID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0

HEADER = struct.Struct("<QQIIIHHIII")   # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
assert HEADER.size == 44
RX, TX, EVENT = 0, 1, 2

CONN_BUF_ALLOC = 256 << 10     # what each connection advertises to the guest
MAX_PAYLOAD = 64 << 10         # per packet to the guest (Linux's own largest)
MAX_CONNECTIONS = 1024
REPLY_LIMIT = 4096             # control packets waiting for receive buffers
LOCAL_PORT_FIRST = 1 << 30
U32 = 0xFFFFFFFF

CONNECTING, ESTABLISHED = "connecting", "established"

COUNTERS = ("tx_packets", "tx_bytes", "rx_bytes", "rx_packets_control", "malformed", "refused", "bad_src_cid",
            "rst_sent", "replies_dropped", "rx_buffer_too_small", "connect_refused", "connections_from_guest",
            "connections_from_host", "credit_violations", "handshakes_refused", "bad_connect_lines")


class VhostVsockUnavailable(UserError):
    """vhost-vsock was asked for and this host cannot provide it."""


def vhost_vsock_available(path: str = VHOST_VSOCK_PATH) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


def require_vhost_vsock(path: str = VHOST_VSOCK_PATH) -> None:
    if not vhost_vsock_available(path):
        raise VhostVsockUnavailable(f"vhost-vsock: {path} is missing (load vhost_vsock, or use pyvmm's own vsock)")


class VsockConnection:
    """One stream: its host end, the credit in both directions, what waits on either side."""

    def __init__(self, guest_port: int, host_port: int, stream: HostStream, state: str) -> None:
        self.guest_port, self.host_port, self.stream, self.state = guest_port, host_port, stream, state
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0            # payload bytes sent to the guest
        self.rx_cnt = 0            # payload bytes the guest sent us
        self.fwd_cnt = 0           # of those, bytes the host socket took
        self.last_fwd_sent = 0     # the fwd_cnt the guest last heard
        self.staged = b""          # host bytes read, waiting for credit and a receive buffer
        self.output = bytearray()  # guest bytes waiting for the host socket
        self.reading = False
        self.host_eof = False
        self.host_shut_wr = False
        self.guest_shut_rcv = False
        self.guest_shut_send = False
        self.closing = False       # the guest shut down both ways: RST once output is flushed
        self.credit_requested = False
        self.update_queued = False

    @property
    def key(self) -> tuple[int, int]:
        return self.guest_port, self.host_port

    @property
    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))


class VirtioVsock(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    name = "virtio-vsock"

    def __init__(self, guest_cid: int, host: VsockHost, *, queue_size: int = 256) -> None:
        if not 3 <= guest_cid < U32:
            raise ValueError(f"vsock: guest CID {guest_cid} is reserved or out of range (3..{U32 - 1})")
        super().__init__((queue_size, queue_size, queue_size))
        self.guest_cid = guest_cid
        self.host = host
        self.conns: dict[tuple[int, int], VsockConnection] = {}
        self._replies: collections.deque = collections.deque()
        self._rx_ready: dict[VsockConnection, None] = {}   # ordered: served round robin
        self._next_local_port = LOCAL_PORT_FIRST
        self._events_pending = 0
        # A CID change the guest has not acknowledged (re-posted its event buffer): host
        # requests wait in _held, the guest would answer them from its old CID.
        self._cid_unacknowledged = False
        self._held: list[tuple[int, HostStream, bytes]] = []
        self._detached = False
        self.stats: collections.Counter[str] = collections.Counter()
        host.start(self._on_host_request)

    # --- configuration and lifecycle ------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def on_reset(self) -> None:
        for conn in list(self.conns.values()):
            self._kill(conn, rst=False)
        self._replies.clear()
        self._events_pending = 0
        self._release_held()   # a driver starting afresh reads the current CID

    def change_guest_cid(self, guest_cid: int) -> None:
        """Give the guest a new CID (a VM restored from a snapshot gets its own): the config
        space shows it and the guest gets a TRANSPORT_RESET event (virtio 1.2, 5.10.6.6), on
        which Linux re-reads guest_cid and resets its connected sockets (listeners stay). The
        connections here are dropped too. Host requests made before the guest acknowledges the
        event (it hands its event buffer back) wait for it, so none is answered from the old CID."""
        if not 3 <= guest_cid < U32:
            raise ValueError(f"vsock: guest CID {guest_cid} is reserved or out of range (3..{U32 - 1})")
        with self.host_work():
            for conn in list(self.conns.values()):
                self._kill(conn, rst=False)
            self._replies.clear()
            self._rx_ready.clear()
            self.guest_cid = guest_cid
            self._events_pending += 1
            self._cid_unacknowledged = True
            self._process_events()

    @property
    def cid_change_pending(self) -> bool:
        """A CID change the guest has not acknowledged yet."""
        with self.lock:
            return self._cid_unacknowledged

    def close(self) -> None:
        """Close every connection and the host side (idempotent); after detach_host() the host
        side and its streams are left to the device that took them."""
        with self.lock:
            if self._detached:
                return
            for conn in list(self.conns.values()):
                self._kill(conn, rst=False)
            for _, stream, _ in self._held:
                stream.close()
            self._held.clear()
            self.host.close()

    def detach_host(self) -> VsockHost:
        """Stop using the host side without closing it, for a device restored in this process
        (which then continues the live connections). Call after save(), while paused."""
        with self.lock:
            self._detached = True
            for conn in self.conns.values():
                if conn.reading:
                    conn.reading = False
                    conn.stream.unwatch_readable()
            self.conns.clear()
            self._rx_ready.clear()
            self._replies.clear()
            for _, stream, _ in self._held:
                stream.close()       # their programs see the connection close before an OK
            self._held.clear()
            return self.host

    def counters(self) -> dict:
        with self.lock:
            stats = {**self.stats, **self.host.counters()}
            return {**{name: stats.get(name, 0) for name in COUNTERS}, "connections": len(self.conns)}

    # --- queues --------------------------------------------------------------------------------------------

    def process_queue(self, queue_index: int) -> None:
        if queue_index == TX:
            self._process_tx()
        elif queue_index == EVENT:
            if self._cid_unacknowledged and not self._events_pending:
                self._release_held()   # the guest handled the reset and re-posted its buffer
            self._process_events()
        self._process_rx()

    def _release_held(self) -> None:
        self._cid_unacknowledged = False
        held, self._held = self._held, []
        for guest_port, stream, early in held:
            if not self._host_request(guest_port, stream, early):
                stream.close()

    def _process_tx(self) -> None:
        queue = self.queues[TX]
        served = False
        while (chain := queue.pop()) is not None:
            self._guest_packet(chain)
            queue.push(chain, 0)
            served = True
        if served:
            self.signal_used(TX)

    def _process_rx(self) -> None:
        """Fill receive buffers: control packets first, then data from connections round robin."""
        if not (self._replies or self._rx_ready) or not self.queue_usable(RX):
            return
        queue = self.queues[RX]
        moved = False
        while self._replies or self._rx_ready:
            conn = None
            if not self._replies:
                conn = next(iter(self._rx_ready))
                if not conn.staged or not conn.peer_credit or conn.state != ESTABLISHED or \
                        self.conns.get(conn.key) is not conn:
                    del self._rx_ready[conn]
                    if self.conns.get(conn.key) is conn:
                        self._update_reader(conn)
                    continue
            chain = queue.pop()
            if chain is None:
                break
            moved = True
            if chain.writable_length < HEADER.size:
                self.stats["rx_buffer_too_small"] += 1
                queue.push(chain, 0)
                continue
            if conn is None:
                queue.push(chain, self._write_reply(chain, self._replies.popleft()))
                continue
            take = min(len(conn.staged), conn.peer_credit, chain.writable_length - HEADER.size, MAX_PAYLOAD)
            payload, conn.staged = conn.staged[:take], conn.staged[take:]
            conn.tx_cnt += take
            self.stats["rx_bytes"] += take
            queue.push(chain, write_buffers(self.memory, chain.writable, self._header(conn, OP_RW, len(payload)) + payload))
            del self._rx_ready[conn]
            if conn.staged:
                self._rx_ready[conn] = None     # to the back of the line
            else:
                self._update_reader(conn)
        if moved:
            self.signal_used(RX)

    def _process_events(self) -> None:
        if not self._events_pending or not self.queue_usable(EVENT):
            return
        queue = self.queues[EVENT]
        moved = False
        while self._events_pending and (chain := queue.pop()) is not None:
            queue.push(chain, write_buffers(self.memory, chain.writable, struct.pack("<I", EVENT_TRANSPORT_RESET)))
            self._events_pending -= 1
            moved = True
        if moved:
            queue.notify_on_next_add()  # the guest's refill after handling the event acknowledges it
            self.signal_used(EVENT)

    def _header(self, conn: VsockConnection, op: int, length: int = 0, flags: int = 0) -> bytes:
        conn.last_fwd_sent = conn.fwd_cnt
        return HEADER.pack(HOST_CID, self.guest_cid, conn.host_port, conn.guest_port, length, TYPE_STREAM, op,
                           flags, CONN_BUF_ALLOC, conn.fwd_cnt & U32)

    def _write_reply(self, chain: DescriptorChain, reply: tuple) -> int:
        conn, op, flags, raw = reply
        if conn is not None:
            if op == OP_CREDIT_UPDATE:
                conn.update_queued = False
            header = self._header(conn, op, flags=flags)
        else:
            header = raw
        self.stats["rx_packets_control"] += 1
        return write_buffers(self.memory, chain.writable, header)

    def _reply(self, conn: VsockConnection | None, op: int, flags: int = 0, raw: bytes = b"") -> None:
        if len(self._replies) >= REPLY_LIMIT:
            self.stats["replies_dropped"] += 1
            return
        self._replies.append((conn, op, flags, raw))

    def _rst_for(self, src_cid: int, src_port: int, dst_cid: int, dst_port: int) -> None:
        """RST answering a guest packet, sent from the address the guest wrote to."""
        self.stats["rst_sent"] += 1
        self._reply(None, OP_RST, raw=HEADER.pack(dst_cid, src_cid, dst_port, src_port, 0, TYPE_STREAM, OP_RST, 0, 0, 0))

    # --- packets from the guest ------------------------------------------------------------------------------

    def _guest_packet(self, chain: DescriptorChain) -> None:
        self.stats["tx_packets"] += 1
        if chain.readable_length < HEADER.size:
            self.stats["malformed"] += 1
            return
        (src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc,
         fwd_cnt) = HEADER.unpack(read_buffers(self.memory, chain.readable, 0, HEADER.size))
        if src_cid != self.guest_cid:
            self.stats["bad_src_cid"] += 1  # not from this guest: nobody to answer
            return
        conn = self.conns.get((src_port, dst_port))
        bad = length > chain.readable_length - HEADER.size or (length and op != OP_RW)
        if bad or dst_cid != HOST_CID or kind != TYPE_STREAM or not OP_REQUEST <= op <= OP_CREDIT_REQUEST:
            self.stats["malformed" if bad else "refused"] += 1
            if conn is not None and dst_cid == HOST_CID:
                self._kill(conn, rst=True)
            elif op != OP_RST:
                self._rst_for(src_cid, src_port, dst_cid, dst_port)
            return
        if conn is None:
            if op == OP_REQUEST:
                self._guest_connect(src_port, dst_port, buf_alloc, fwd_cnt)
            elif op != OP_RST:
                self._rst_for(src_cid, src_port, dst_cid, dst_port)
            return
        if (buf_alloc, fwd_cnt) != (conn.peer_buf_alloc, conn.peer_fwd_cnt):
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
            conn.credit_requested = False
        if op == OP_RW:
            self._guest_data(conn, chain, length)
        elif op == OP_RESPONSE and conn.state == CONNECTING:
            self._guest_accepted(conn)
        elif op == OP_SHUTDOWN:
            conn.guest_shut_rcv |= bool(flags & SHUTDOWN_RCV)
            conn.guest_shut_send |= bool(flags & SHUTDOWN_SEND)
            conn.closing = conn.guest_shut_rcv and conn.guest_shut_send
            if conn.guest_shut_rcv:
                conn.staged = b""
            self._flush_host(conn)
        elif op == OP_CREDIT_REQUEST:
            self._credit_update(conn)
        elif op == OP_RST:
            self._kill(conn, rst=False)
        elif op != OP_CREDIT_UPDATE:  # a second REQUEST, a RESPONSE we did not ask for
            self._kill(conn, rst=True)
        if self.conns.get(conn.key) is conn:
            if conn.staged and conn.peer_credit and conn.state == ESTABLISHED:
                self._rx_ready[conn] = None
            self._update_reader(conn)

    def _guest_connect(self, guest_port: int, host_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            self.stats["connect_refused"] += 1
            self._rst_for(self.guest_cid, guest_port, HOST_CID, host_port)
            return
        try:
            stream = self.host.connect(host_port)
        except OSError as exc:  # nobody serves that port
            self.stats["connect_refused"] += 1
            log.debug("vsock: guest port %d -> host port %d: %s", guest_port, host_port, exc.strerror or exc)
            self._rst_for(self.guest_cid, guest_port, HOST_CID, host_port)
            return
        conn = VsockConnection(guest_port, host_port, stream, ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self._add(conn)
        self.stats["connections_from_guest"] += 1
        self._reply(conn, OP_RESPONSE)
        self._update_reader(conn)

    def _guest_accepted(self, conn: VsockConnection) -> None:
        conn.state = ESTABLISHED
        try:
            self.host.accepted(conn.stream, conn.host_port)
        except OSError:
            self._kill(conn, rst=True)
            return
        self.stats["connections_from_host"] += 1

    def _guest_data(self, conn: VsockConnection, chain: DescriptorChain, length: int) -> None:
        if conn.state != ESTABLISHED or conn.guest_shut_send:
            self._kill(conn, rst=True)
            return
        if len(conn.output) + length > CONN_BUF_ALLOC:
            self.stats["credit_violations"] += 1
            log.warning("vsock: guest port %d sent beyond its credit; connection reset", conn.guest_port)
            self._kill(conn, rst=True)
            return
        conn.rx_cnt += length
        self.stats["tx_bytes"] += length
        conn.output += read_buffers(self.memory, chain.readable, HEADER.size, length)
        self._flush_host(conn)

    # --- host streams (callbacks run on the I/O thread) ------------------------------------------------------

    def _add(self, conn: VsockConnection) -> None:
        self.conns[conn.key] = conn
        self.host.adopt(conn.key, conn.stream)

    def _update_reader(self, conn: VsockConnection) -> None:
        """Read the host socket only while its bytes could go somewhere."""
        can_send = conn.state == ESTABLISHED and not (conn.host_eof or conn.guest_shut_rcv or conn.closing)
        want = can_send and not conn.staged and conn.peer_credit > 0
        if want and not conn.reading:
            conn.reading = True
            stream = conn.stream
            stream.watch_readable(lambda: self._on_host_readable(conn, stream))
        elif not want and conn.reading:
            conn.reading = False
            conn.stream.unwatch_readable()
        if can_send and not conn.peer_credit and not conn.credit_requested:
            conn.credit_requested = True   # the guest owes us an update; ask, in case it is waiting on us
            self._reply(conn, OP_CREDIT_REQUEST)

    def _on_host_readable(self, conn: VsockConnection, stream: HostStream) -> None:
        with self.host_work():
            if self.conns.get(conn.key) is not conn or conn.stream is not stream:
                return
            room = min(conn.peer_credit, MAX_PAYLOAD)
            if conn.staged or not room:
                self._update_reader(conn)
                return
            try:
                data = stream.recv(room)
            except OSError:
                self._kill(conn, rst=True)
                self._process_rx()
                return
            if data is None:
                return
            if not data:
                conn.host_eof = True   # the host will send no more; the guest may still talk
                self._reply(conn, OP_SHUTDOWN, SHUTDOWN_SEND)
            else:
                conn.staged = data
                self._rx_ready[conn] = None
            self._update_reader(conn)
            self._process_rx()

    def _flush_host(self, conn: VsockConnection) -> None:
        stream = conn.stream
        while conn.output:
            try:
                sent = stream.send(conn.output)
            except OSError:
                self._kill(conn, rst=True)
                return
            if sent is None:
                stream.watch_writable(lambda: self._on_host_writable(conn, stream))
                return
            del conn.output[:sent]
            conn.fwd_cnt += sent
        if conn.closing:
            self._kill(conn, rst=True)
            return
        if conn.guest_shut_send and not conn.host_shut_wr:
            conn.host_shut_wr = True
            stream.shutdown_write()
        # the guest believes it has this much room left; tell it about freed space before it runs dry
        if conn.fwd_cnt != conn.last_fwd_sent and CONN_BUF_ALLOC - (conn.rx_cnt - conn.last_fwd_sent) < CONN_BUF_ALLOC // 2:
            self._credit_update(conn)

    def _credit_update(self, conn: VsockConnection) -> None:
        if not conn.update_queued:
            conn.update_queued = True
            self._reply(conn, OP_CREDIT_UPDATE)

    def _on_host_writable(self, conn: VsockConnection, stream: HostStream) -> None:
        with self.host_work():
            if self.conns.get(conn.key) is conn and conn.stream is stream:
                self._flush_host(conn)
                self._process_rx()

    def _kill(self, conn: VsockConnection, *, rst: bool) -> None:
        """Forget a connection and close its host stream; tell the guest with RST when it does not know."""
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
            self.host.release(conn.key)
        self._rx_ready.pop(conn, None)
        conn.reading = False
        conn.stream.close()
        if any(reply[0] is conn for reply in self._replies):  # nothing more about it but the RST
            self._replies = collections.deque(reply for reply in self._replies if reply[0] is not conn)
        if rst:
            self.stats["rst_sent"] += 1
            self._reply(conn, OP_RST)

    # --- host-initiated connections ------------------------------------------------------------------------------

    def _on_host_request(self, guest_port: int, stream: HostStream, early: bytes) -> bool:
        """A host program asks for guest port `guest_port` (on the I/O thread); `early` are the
        bytes it sent right behind its request: they wait for the guest."""
        with self.host_work():
            if self._cid_unacknowledged and not self._detached:
                self._held.append((guest_port, stream, early))
                return True
            return self._host_request(guest_port, stream, early)

    def _host_request(self, guest_port: int, stream: HostStream, early: bytes) -> bool:
        if self._detached or len(self.conns) >= MAX_CONNECTIONS:
            self.stats["connect_refused"] += 1
            return False
        conn = VsockConnection(guest_port, self._local_port(guest_port), stream, CONNECTING)
        conn.staged = early[:MAX_PAYLOAD]
        self._add(conn)
        self._reply(conn, OP_REQUEST)
        self._process_rx()
        return True

    def _local_port(self, guest_port: int) -> int:
        while True:
            port = self._next_local_port
            self._next_local_port = port + 1 if port + 1 < U32 else LOCAL_PORT_FIRST
            if (guest_port, port) not in self.conns:
                return port

    # --- snapshot ------------------------------------------------------------------------------------------------------

    def save(self) -> VsockState:
        """Every transmit packet is served whole under the device lock: nothing is in flight."""
        with self.lock:
            return VsockState(
                virtio=self.save_virtio(), guest_cid=self.guest_cid,
                connections=tuple(saved_connection(conn) for conn in self.conns.values()),
                replies=tuple(self._reply_state(*reply) for reply in self._replies),
                rx_ready=tuple(conn.key for conn in self._rx_ready),
                events_pending=self._events_pending, next_local_port=self._next_local_port,
                stats={name: count for name, count in self.stats.items() if count})

    def _reply_state(self, conn: VsockConnection | None, op: int, flags: int, raw: bytes) -> ReplyState:
        if conn is None or self.conns.get(conn.key) is conn:
            return ReplyState(key=None if conn is None else conn.key, op=op, flags=flags, raw=raw)
        # about a connection already gone (its RST): the header is all there is left to send
        header = HEADER.pack(HOST_CID, self.guest_cid, conn.host_port, conn.guest_port, 0, TYPE_STREAM, op, flags,
                             CONN_BUF_ALLOC, conn.fwd_cnt & U32)
        return ReplyState(key=None, op=op, flags=flags, raw=header)

    def check_restorable(self, state: State) -> None:
        state = _require_vsock(state)
        if state.guest_cid != self.guest_cid:
            state.fail("guest_cid", f"{state.guest_cid}, this device's is {self.guest_cid}")
        self.check_virtio(state.virtio)

    def restore(self, state: VsockState) -> None:  # type: ignore[override]
        """Load a `save()` result. Connections whose host stream the host side still has go on;
        the others are reset: the guest gets an RST for each, nothing else changes for it."""
        self.check_restorable(state)
        with self.host_work():
            for conn in list(self.conns.values()):
                self._kill(conn, rst=False)
            self.restore_virtio(state.virtio)
            self._events_pending = state.events_pending
            self._next_local_port = state.next_local_port
            self.stats = collections.Counter(state.stats)
            self._replies.clear()
            self._rx_ready.clear()
            for saved in state.connections:
                stream = self.host.reclaim((saved.guest_port, saved.host_port))
                if stream is None:
                    self._rst_for(self.guest_cid, saved.guest_port, HOST_CID, saved.host_port)
                    continue
                conn = VsockConnection(saved.guest_port, saved.host_port, stream, saved.state)
                connection_fields(conn, saved)
                self.conns[conn.key] = conn
            for reply in state.replies:
                reply_conn = None if reply.key is None else self.conns.get(reply.key)
                if reply.key is None or reply_conn is not None:
                    self._replies.append((reply_conn, reply.op, reply.flags, reply.raw))
            for key in state.rx_ready:
                if key in self.conns:
                    self._rx_ready[self.conns[key]] = None
            for conn in list(self.conns.values()):
                self._update_reader(conn)
                if conn.output or conn.closing:
                    self._flush_host(conn)
            if self.active:
                self._process_events()
                self._process_rx()


def _require_vsock(state: State) -> VsockState:
    return require(state, VsockState)
