"""vhost-user wire format (QEMU docs/interop/vhost-user.rst): messages, payloads, fd passing.

A message is a 12-byte header (request, flags, payload size; native byte order) and a
payload. File descriptors travel as SCM_RIGHTS ancillary data attached to the header.
Everything here is stateless; `frontend.py` holds the connection and its rules.
"""

from __future__ import annotations

import array
import enum
import errno
import os
import socket
import struct
from dataclasses import dataclass, field

from ..errors import UserError


class VhostUserError(UserError):
    """The vhost-user back-end failed, refused a request or broke the protocol."""


class VhostUserDisconnected(VhostUserError):
    """The back-end closed the connection (or the connection was closed after an error)."""


class VhostUserTimeout(VhostUserError):
    """The back-end did not answer in time."""


class VhostUserProtocolError(VhostUserError):
    """The back-end sent something the protocol does not allow."""


class Request(enum.IntEnum):
    """Front-end message types."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol features (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16

    @property
    def mask(self) -> int:
        return 1 << self.value


# Feature bits that only exist on the vhost-user channel: never offer them to a guest driver.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VHOST_F_LOG_ALL = 1 << 26

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

HEADER = struct.Struct("=III")          # request, flags, size
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")      # index, num
VRING_ADDR = struct.Struct("=IIQQQQ")   # index, flags, desc, used, avail, log
MEMORY_HEADER = struct.Struct("=II")    # number of regions, padding
MEMORY_REGION = struct.Struct("=QQQQ")  # guest address, size, user address, mmap offset
CONFIG_HEADER = struct.Struct("=III")   # offset, size, flags

MAX_MEMORY_REGIONS = 8    # SET_MEM_TABLE without CONFIGURE_MEM_SLOTS; also the fds a message may carry
MAX_CONFIG_SIZE = 256
MAX_PAYLOAD = 4096        # larger than any reply we ask for: anything bigger is a broken peer
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8       # SET_VRING_KICK/CALL/ERR without an fd (polling)

CONFIG_FLAG_WRITABLE = 0  # SET_CONFIG from a guest write
CONFIG_FLAG_MIGRATION = 1


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


@dataclass
class Message:
    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


@dataclass(frozen=True)
class MemoryTableEntry:
    """One region of SET_MEM_TABLE: guest-physical range, where it sits in our address space, its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    fd: int
    mmap_offset: int = 0


# --- payloads ---------------------------------------------------------------------------------------


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def decode_u64(payload: bytes) -> int:
    if len(payload) != U64.size:
        raise VhostUserProtocolError(f"vhost-user: expected an 8-byte payload, got {len(payload)} bytes")
    return U64.unpack(payload)[0]


def encode_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_vring_state(payload: bytes) -> tuple[int, int]:
    if len(payload) != VRING_STATE.size:
        raise VhostUserProtocolError(f"vhost-user: expected a vring state, got {len(payload)} bytes")
    return VRING_STATE.unpack(payload)


def encode_vring_addr(index: int, *, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> bytes:
    return VRING_ADDR.pack(index, flags, desc, used, avail, log)


def decode_vring_addr(payload: bytes) -> dict:
    index, flags, desc, used, avail, log = VRING_ADDR.unpack(payload)
    return {"index": index, "flags": flags, "desc": desc, "used": used, "avail": avail, "log": log}


def encode_vring_file(index: int, has_fd: bool) -> bytes:
    """SET_VRING_KICK/CALL/ERR: the ring index, and bit 8 when no fd comes with the message."""
    if not 0 <= index <= VRING_INDEX_MASK:
        raise ValueError(f"vring index {index} does not fit the vhost-user message")
    return U64.pack(index | (0 if has_fd else VRING_NOFD))


def encode_memory_table(entries: list[MemoryTableEntry]) -> tuple[bytes, list[int]]:
    if not entries:
        raise VhostUserError("vhost-user: SET_MEM_TABLE needs at least one memory region")
    if len(entries) > MAX_MEMORY_REGIONS:
        raise VhostUserError(f"vhost-user: {len(entries)} memory regions, the protocol carries at most "
                             f"{MAX_MEMORY_REGIONS}")
    body = MEMORY_HEADER.pack(len(entries), 0) + b"".join(
        MEMORY_REGION.pack(e.guest_phys_addr, e.memory_size, e.userspace_addr, e.mmap_offset) for e in entries)
    return body, [e.fd for e in entries]


def decode_memory_table(payload: bytes) -> list[tuple[int, int, int, int]]:
    count, _ = MEMORY_HEADER.unpack_from(payload)
    if count > MAX_MEMORY_REGIONS or len(payload) < MEMORY_HEADER.size + count * MEMORY_REGION.size:
        raise VhostUserProtocolError(f"vhost-user: malformed memory table ({count} regions)")
    return [MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size) for i in range(count)]


def encode_config(offset: int, size: int, flags: int = 0, data: bytes | None = None) -> bytes:
    """GET_CONFIG carries `size` zero bytes for the back-end to fill; SET_CONFIG carries the data."""
    if size > MAX_CONFIG_SIZE:
        raise ValueError(f"config access of {size} bytes exceeds {MAX_CONFIG_SIZE}")
    data = bytes(size) if data is None else bytes(data)
    if len(data) != size:
        raise ValueError("config data length does not match its size")
    return CONFIG_HEADER.pack(offset, size, flags) + data


def decode_config(payload: bytes) -> tuple[int, int, int, bytes]:
    if len(payload) < CONFIG_HEADER.size:
        raise VhostUserProtocolError(f"vhost-user: config payload of {len(payload)} bytes")
    offset, size, flags = CONFIG_HEADER.unpack_from(payload)
    data = payload[CONFIG_HEADER.size:]
    if len(data) != size:
        raise VhostUserProtocolError(f"vhost-user: config payload says {size} bytes, carries {len(data)}")
    return offset, size, flags, data


# --- the socket ---------------------------------------------------------------------------------------


def send_message(sock: socket.socket, message: Message) -> None:
    """Send one message, its fds attached to the header, in a single sendmsg."""
    if len(message.fds) > MAX_MEMORY_REGIONS:
        raise ValueError(f"a vhost-user message carries at most {MAX_MEMORY_REGIONS} fds")
    data = HEADER.pack(message.request, message.flags, len(message.payload)) + message.payload
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", message.fds).tobytes())] \
        if message.fds else []
    sent = sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)
    if sent < len(data):  # the fds went with the first part; the rest is plain data
        sock.sendall(data[sent:], socket.MSG_NOSIGNAL)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise VhostUserDisconnected("vhost-user back-end closed the connection")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket, max_payload: int = MAX_PAYLOAD) -> Message:
    """Receive one message (blocking, within the socket's timeout). Received fds are the caller's to close."""
    fds = array.array("i")
    data, ancillary, msg_flags, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_MEMORY_REGIONS * fds.itemsize))
    for level, kind, cmsg in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cmsg[:len(cmsg) - len(cmsg) % fds.itemsize])
    received = list(fds)
    try:
        if not data:
            raise VhostUserDisconnected("vhost-user back-end closed the connection")
        if msg_flags & socket.MSG_CTRUNC:
            raise VhostUserProtocolError("vhost-user: peer sent more file descriptors than a message may carry")
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        request, flags, size = HEADER.unpack(data)
        if size > max_payload:
            raise VhostUserProtocolError(f"vhost-user: {request_name(request)} carries a {size}-byte payload")
        payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        close_fds(received)
        raise
    return Message(request, flags, payload, received)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
