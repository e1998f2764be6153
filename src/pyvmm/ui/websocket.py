"""A minimal WebSocket (RFC 6455) server side over a connected socket, for the console.

Enough for a browser talking to `pyvmm ui`: the opening handshake's accept key, masked
client frames (text, binary, ping, close; fragmented messages are joined), unmasked server
frames. Sends are serialised by a lock, so a reader thread and a writer thread can share
one connection.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading

from ..errors import PyvmmError

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 1 << 20     # console input: keystrokes and pastes, never megabytes


class WebSocketClosed(PyvmmError):
    """The peer closed the connection (or broke the protocol)."""


def accept_key(client_key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((client_key + GUID).encode()).digest()).decode()


def valid_client_key(key: str | None) -> bool:
    try:
        return key is not None and len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def encode_frame(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return header + payload


class WebSocket:
    """One accepted connection; `rfile` is the HTTP handler's buffered reader (it may hold
    bytes the client sent right after its handshake)."""

    def __init__(self, sock: socket.socket, rfile) -> None:
        self.sock, self.rfile = sock, rfile
        self._send_lock = threading.Lock()
        self.closed = False

    def _read_exact(self, count: int) -> bytes:
        data = self.rfile.read(count)
        if data is None or len(data) < count:
            raise WebSocketClosed("the connection ended")
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read_exact(2)
        if first & 0x70:
            raise WebSocketClosed("reserved bits set (no extension was agreed)")
        if not second & 0x80:
            raise WebSocketClosed("a client frame was not masked")
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read_exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read_exact(8))[0]
        if length > MAX_MESSAGE:
            raise WebSocketClosed("frame too large")
        mask = self._read_exact(4)
        masked = self._read_exact(length)
        key = (mask * (length // 4 + 1))[:length]
        payload = (int.from_bytes(masked, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
        return bool(first & 0x80), first & 0x0F, payload

    def receive(self) -> bytes:
        """The next data message's bytes (text as UTF-8); answers pings; WebSocketClosed at the end."""
        message, kind = b"", None
        while True:
            final, opcode, payload = self._frame()
            if opcode == CLOSE:
                self.close(payload[:2] if len(payload) >= 2 else b"")
                raise WebSocketClosed("closed by the client")
            if opcode == PING:
                self.send(PONG, payload)
                continue
            if opcode == PONG:
                continue
            if opcode in (TEXT, BINARY):
                if kind is not None:
                    raise WebSocketClosed("a new message began inside a fragmented one")
                kind = opcode
            elif opcode != CONTINUATION or kind is None:
                raise WebSocketClosed(f"unexpected opcode {opcode}")
            message += payload
            if len(message) > MAX_MESSAGE:
                raise WebSocketClosed("message too large")
            if final:
                return message

    def send(self, opcode: int, payload: bytes) -> None:
        with self._send_lock:
            if self.closed and opcode != CLOSE:
                raise WebSocketClosed("closed")
            self.sock.sendall(encode_frame(opcode, payload))

    def send_binary(self, payload: bytes) -> None:
        self.send(BINARY, payload)

    def send_text(self, text: str) -> None:
        self.send(TEXT, text.encode())

    def close(self, code: bytes = struct.pack("!H", 1000), reason: str = "") -> None:
        """Send a close frame once (the peer's, echoed, or ours)."""
        with self._send_lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.sock.sendall(encode_frame(CLOSE, code + reason.encode()[:120]))
            except OSError:
                pass
