"""virtio-vsock's saved state: the connection table as the guest knows it (see vsock.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ...persist import State
from .device import VirtioDeviceState

U32 = 0xFFFFFFFF
CONN_STATES = ("connecting", "established")
MAX_CONNECTIONS = 1024
REPLY_LIMIT = 4096
HEADER_SIZE = 44


@dataclass(frozen=True)
class VsockConnectionState(State):
    """One stream: its ports, whether the guest accepted it yet, the credit both ways (counters
    as the guest and the device exchanged them), the bytes waiting either way and the shutdowns."""
    KIND = "vsock_connection"
    guest_port: int
    host_port: int
    state: str
    peer_buf_alloc: int
    peer_fwd_cnt: int
    tx_cnt: int
    rx_cnt: int
    fwd_cnt: int
    last_fwd_sent: int
    staged: bytes           # host bytes read, waiting for credit and a receive buffer
    output: bytes           # guest bytes the host has not taken yet
    host_eof: bool
    host_shut_wr: bool
    guest_shut_rcv: bool
    guest_shut_send: bool
    closing: bool
    credit_requested: bool
    update_queued: bool

    def validate(self) -> None:
        for name in ("guest_port", "host_port", "peer_buf_alloc", "peer_fwd_cnt"):
            self.check_range(name, 0, U32)
        for name in ("tx_cnt", "rx_cnt", "fwd_cnt", "last_fwd_sent"):
            self.check_range(name, 0, 1 << 64)
        if self.state not in CONN_STATES:
            self.fail("state", f"{self.state!r} is not one of {', '.join(CONN_STATES)}")


@dataclass(frozen=True)
class ReplyState(State):
    """A control packet waiting for a receive buffer: about a connection (its key), or a raw
    header answering a packet that had none (an RST)."""
    KIND = "vsock_reply"
    key: tuple[int, int] | None
    op: int
    flags: int
    raw: bytes

    def validate(self) -> None:
        self.check_range("op", 0, 7)
        self.check_range("flags", 0, U32)
        if self.key is None and len(self.raw) != HEADER_SIZE:
            self.fail("raw", f"{len(self.raw)} bytes, a packet header has {HEADER_SIZE}")


@dataclass(frozen=True)
class VsockState(State):
    KIND = "virtio_vsock"
    virtio: VirtioDeviceState
    guest_cid: int
    connections: tuple[VsockConnectionState, ...]
    replies: tuple[ReplyState, ...]
    rx_ready: tuple[tuple[int, int], ...]   # connections with data for the guest, in serving order
    events_pending: int
    next_local_port: int
    stats: dict[str, int]

    def validate(self) -> None:
        self.check_range("guest_cid", 3, U32 - 1)
        if len(self.connections) > MAX_CONNECTIONS:
            self.fail("connections", f"{len(self.connections)}, at most {MAX_CONNECTIONS}")
        keys = {(c.guest_port, c.host_port) for c in self.connections}
        if len(keys) != len(self.connections):
            self.fail("connections", "two connections share their ports")
        if len(self.replies) > REPLY_LIMIT:
            self.fail("replies", f"{len(self.replies)}, at most {REPLY_LIMIT}")
        for i, reply in enumerate(self.replies):
            if reply.key is not None and reply.key not in keys:
                self.fail(f"replies[{i}]", f"about connection {reply.key}, which is not in the table")
        for key in self.rx_ready:
            if key not in keys:
                self.fail("rx_ready", f"connection {key} is not in the table")
        self.check_range("events_pending", 0, 1 << 32)
        self.check_range("next_local_port", 0, U32)
        for name, count in self.stats.items():
            if count < 0:
                self.fail(f"stats[{name!r}]", f"{count} is negative")


_SAVED_FIELDS = ("peer_buf_alloc", "peer_fwd_cnt", "tx_cnt", "rx_cnt", "fwd_cnt", "last_fwd_sent", "host_eof",
                 "host_shut_wr", "guest_shut_rcv", "guest_shut_send", "closing", "credit_requested", "update_queued")


def saved_connection(conn) -> VsockConnectionState:
    """A vsock.VsockConnection's state."""
    return VsockConnectionState(guest_port=conn.guest_port, host_port=conn.host_port, state=conn.state,
                                staged=bytes(conn.staged), output=bytes(conn.output),
                                **{name: getattr(conn, name) for name in _SAVED_FIELDS})


def connection_fields(conn, saved: VsockConnectionState) -> None:
    """Load `saved` into a vsock.VsockConnection made for its ports, stream and state."""
    for name in _SAVED_FIELDS:
        setattr(conn, name, getattr(saved, name))
    conn.staged, conn.output = saved.staged, bytearray(saved.output)
