"""virtio-vsock (virtio 1.2 section 5.10): guest stream sockets mapped to host Unix sockets.

The host side follows Firecracker's convention, so its tools work unchanged:

- the guest connects to (CID 2, port P): pyvmm connects to the Unix socket `{uds_path}_{P}`
  and answers RESPONSE, or RST when nobody listens there;
- a host program connects to `uds_path` and writes "CONNECT <P>\\n": pyvmm sends the guest a
  REQUEST from a fresh local port L to its port P and, once the guest accepts (RESPONSE),
  writes "OK <L>\\n" back; from then on bytes flow both ways.

Flow control is credit based (5.10.6.3). Every packet carries the sender's buf_alloc and
fwd_cnt; pyvmm never sends more payload than the guest's buf_alloc - (tx_cnt - fwd_cnt),
and it counts guest bytes as forwarded only once the host socket took them, so a guest
that honours the credit we advertise can never make us hold more than CONN_BUF_ALLOC
per connection (one that does not is reset).

Queues: 0 receive (device -> driver), 1 transmit, 2 event. Connections live in host
sockets and do not survive a snapshot: on restore the guest gets TRANSPORT_RESET on the
event queue and drops them, as it does under Firecracker.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import struct
from dataclasses import dataclass

from ...errors import UserError
from ...iothread import WritableWatch
from ...persist import State, require
from .console import listen_unix
from .device import VIRTIO_ID_VSOCK, VirtioDevice, VirtioDeviceState
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
MAX_HANDSHAKES = 64            # host clients that have not sent their CONNECT line yet
REPLY_LIMIT = 4096             # control packets waiting for receive buffers
CONNECT_LINE_MAX = 64
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
    """One stream: its host socket, the credit in both directions, what waits on either side."""

    def __init__(self, guest_port: int, host_port: int, sock: socket.socket, state: str) -> None:
        self.guest_port, self.host_port, self.sock, self.state = guest_port, host_port, sock, state
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

    def __init__(self, guest_cid: int, uds_path: str, *, iothread, queue_size: int = 256) -> None:
        if not 3 <= guest_cid < U32:
            raise ValueError(f"vsock: guest CID {guest_cid} is reserved or out of range (3..{U32 - 1})")
        super().__init__((queue_size, queue_size, queue_size))
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.iothread = iothread
        self.conns: dict[tuple[int, int], VsockConnection] = {}
        self._replies: collections.deque = collections.deque()
        self._rx_ready: dict[VsockConnection, None] = {}   # ordered: served round robin
        self._handshakes: dict[socket.socket, bytearray] = {}
        self._next_local_port = LOCAL_PORT_FIRST
        self._events_pending = 0
        self.stats = collections.Counter()
        self._watch = WritableWatch(iothread)
        try:
            self._listener = listen_unix(uds_path)
        except BaseException:
            self._watch.close()
            raise
        listener = self._listener
        iothread.add_reader(listener.fileno(), lambda: self._on_accept(listener))

    # --- configuration and lifecycle ------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def on_reset(self) -> None:
        for conn in list(self.conns.values()):
            self._kill(conn, rst=False)
        self._replies.clear()
        self._events_pending = 0

    def close(self) -> None:
        """Close every connection and the listener, remove the socket file (idempotent)."""
        with self.lock:
            for conn in list(self.conns.values()):
                self._kill(conn, rst=False)
            for sock in list(self._handshakes):
                self._drop_handshake(sock)
            if self._listener is not None:
                self.iothread.remove_reader(self._listener.fileno())
                self.iothread.call_soon(self._listener.close)
                self._listener = None
                try:
                    os.unlink(self.uds_path)
                except OSError:
                    pass
            self._watch.close()

    def counters(self) -> dict:
        with self.lock:
            return {**{name: self.stats[name] for name in COUNTERS}, "connections": len(self.conns)}

    # --- queues --------------------------------------------------------------------------------------------

    def process_queue(self, queue_index: int) -> None:
        if queue_index == TX:
            self._process_tx()
        elif queue_index == EVENT:
            self._process_events()
        self._process_rx()

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
            self.signal_used(EVENT)

    # --- packets to the guest -----------------------------------------------------------------------------

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
        path = f"{self.uds_path}_{host_port}"
        if len(self.conns) >= MAX_CONNECTIONS:
            self.stats["connect_refused"] += 1
            self._rst_for(self.guest_cid, guest_port, HOST_CID, host_port)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as exc:  # nobody listens, or the backlog is full (EAGAIN)
            sock.close()
            self.stats["connect_refused"] += 1
            log.debug("vsock: guest port %d -> %s: %s", guest_port, path, exc.strerror)
            self._rst_for(self.guest_cid, guest_port, HOST_CID, host_port)
            return
        conn = VsockConnection(guest_port, host_port, sock, ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self.conns[conn.key] = conn
        self.stats["connections_from_guest"] += 1
        self._reply(conn, OP_RESPONSE)
        self._update_reader(conn)

    def _guest_accepted(self, conn: VsockConnection) -> None:
        conn.state = ESTABLISHED
        try:
            conn.sock.send(f"OK {conn.host_port}\n".encode())  # the first bytes on a fresh socket: no room issue
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

    # --- host sockets (callbacks run on the I/O thread) ------------------------------------------------------

    def _update_reader(self, conn: VsockConnection) -> None:
        """Read the host socket only while its bytes could go somewhere."""
        can_send = conn.state == ESTABLISHED and not (conn.host_eof or conn.guest_shut_rcv or conn.closing)
        want = can_send and not conn.staged and conn.peer_credit > 0
        if want and not conn.reading:
            conn.reading = True
            sock = conn.sock
            self.iothread.add_reader(sock.fileno(), lambda: self._on_host_readable(conn, sock))
        elif not want and conn.reading:
            conn.reading = False
            self.iothread.remove_reader(conn.sock.fileno())
        if can_send and not conn.peer_credit and not conn.credit_requested:
            conn.credit_requested = True   # the guest owes us an update; ask, in case it is waiting on us
            self._reply(conn, OP_CREDIT_REQUEST)

    def _on_host_readable(self, conn: VsockConnection, sock: socket.socket) -> None:
        with self.host_work():
            if self.conns.get(conn.key) is not conn or conn.sock is not sock:
                return
            room = min(conn.peer_credit, MAX_PAYLOAD)
            if conn.staged or not room:
                self._update_reader(conn)
                return
            try:
                data = sock.recv(room)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._kill(conn, rst=True)
                self._process_rx()
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
        sock = conn.sock
        while conn.output:
            try:
                sent = sock.send(conn.output)
            except (BlockingIOError, InterruptedError):
                self._watch.watch(sock.fileno(), lambda: self._on_host_writable(conn, sock))
                return
            except OSError:
                self._kill(conn, rst=True)
                return
            del conn.output[:sent]
            conn.fwd_cnt += sent
        if conn.closing:
            self._kill(conn, rst=True)
            return
        if conn.guest_shut_send and not conn.host_shut_wr:
            conn.host_shut_wr = True
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        # the guest believes it has this much room left; tell it about freed space before it runs dry
        if conn.fwd_cnt != conn.last_fwd_sent and CONN_BUF_ALLOC - (conn.rx_cnt - conn.last_fwd_sent) < CONN_BUF_ALLOC // 2:
            self._credit_update(conn)

    def _credit_update(self, conn: VsockConnection) -> None:
        if not conn.update_queued:
            conn.update_queued = True
            self._reply(conn, OP_CREDIT_UPDATE)

    def _on_host_writable(self, conn: VsockConnection, sock: socket.socket) -> None:
        with self.host_work():
            if self.conns.get(conn.key) is conn and conn.sock is sock:
                self._flush_host(conn)
                self._process_rx()

    def _kill(self, conn: VsockConnection, *, rst: bool) -> None:
        """Forget a connection and close its host socket; tell the guest with RST when it does not know."""
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self._rx_ready.pop(conn, None)
        if conn.reading:
            conn.reading = False
            self.iothread.remove_reader(conn.sock.fileno())
        self._watch.forget(conn.sock.fileno())
        self.iothread.call_soon(conn.sock.close)
        if any(reply[0] is conn for reply in self._replies):  # nothing more about it but the RST
            self._replies = collections.deque(reply for reply in self._replies if reply[0] is not conn)
        if rst:
            self.stats["rst_sent"] += 1
            self._reply(conn, OP_RST)

    # --- host-initiated connections ------------------------------------------------------------------------------

    def _on_accept(self, listener: socket.socket) -> None:
        with self.host_work():
            if listener is not self._listener:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("vsock: accept on %s failed: %s", self.uds_path, exc.strerror)
                return
            if len(self._handshakes) >= MAX_HANDSHAKES:
                self.stats["handshakes_refused"] += 1
                sock.close()
                return
            sock.setblocking(False)
            self._handshakes[sock] = bytearray()
            self.iothread.add_reader(sock.fileno(), lambda: self._on_handshake(sock))

    def _drop_handshake(self, sock: socket.socket, close: bool = True) -> None:
        if self._handshakes.pop(sock, None) is not None:
            self.iothread.remove_reader(sock.fileno())
            if close:
                self.iothread.call_soon(sock.close)

    def _on_handshake(self, sock: socket.socket) -> None:
        """Read "CONNECT <port>\\n" and ask the guest for that port."""
        with self.host_work():
            line = self._handshakes.get(sock)
            if line is None:
                return
            try:
                data = sock.recv(CONNECT_LINE_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            line += data
            if b"\n" not in line:
                if not data or len(line) >= CONNECT_LINE_MAX:
                    self.stats["bad_connect_lines"] += 1
                    self._drop_handshake(sock)
                return
            request, rest = bytes(line).split(b"\n", 1)
            words = request.strip().split()
            port = int(words[1]) if len(words) == 2 and words[0] == b"CONNECT" and words[1].isdigit() else -1
            if not 0 <= port <= U32 or len(self.conns) >= MAX_CONNECTIONS:
                self.stats["bad_connect_lines" if port < 0 or port > U32 else "connect_refused"] += 1
                self._drop_handshake(sock)
                return
            self._drop_handshake(sock, close=False)
            conn = VsockConnection(port, self._local_port(port), sock, CONNECTING)
            conn.staged = rest[:MAX_PAYLOAD]   # bytes sent right behind the line wait for the guest
            self.conns[conn.key] = conn
            self._reply(conn, OP_REQUEST)
            self._process_rx()

    def _local_port(self, guest_port: int) -> int:
        while True:
            port = self._next_local_port
            self._next_local_port = port + 1 if port + 1 < U32 else LOCAL_PORT_FIRST
            if (guest_port, port) not in self.conns:
                return port

    # --- snapshot ------------------------------------------------------------------------------------------------------

    def save(self) -> VsockState:
        with self.lock:
            return VsockState(virtio=self.save_virtio(), guest_cid=self.guest_cid)

    def check_restorable(self, state: State) -> None:
        state = require(state, VsockState)
        if state.guest_cid != self.guest_cid:
            state.fail("guest_cid", f"{state.guest_cid}, this device's is {self.guest_cid}")
        self.check_virtio(state.virtio)

    def restore(self, state: VsockState) -> None:  # type: ignore[override]
        """Load a `save()` result: the guest's connections are gone, so it hears TRANSPORT_RESET."""
        self.check_restorable(state)
        with self.host_work():
            self.restore_virtio(state.virtio)
            for conn in list(self.conns.values()):
                self._kill(conn, rst=False)
            self._replies.clear()
            self._events_pending = 1
            self._process_events()


@dataclass(frozen=True)
class VsockState(State):
    KIND = "virtio_vsock"
    virtio: VirtioDeviceState
    guest_cid: int

    def validate(self) -> None:
        self.check_range("guest_cid", 3, U32 - 1)
