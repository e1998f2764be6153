"""The migration stream: addresses, sockets and checksummed frames.

A stream opens with an 8-byte magic and a 4-byte format version (the source sends its own,
the destination answers with its own: a mismatch is refused before anything else moves).
Then frames, each `kind (u8) | flags (u8) | reserved (u16) | length (u32) | crc32 (u32)`
followed by `length` payload bytes; the CRC-32 covers the first 8 header bytes and the
payload, so a flipped bit anywhere in a frame is caught before the frame is used.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass

from ..errors import UserError

MAGIC = b"PYVMMIGR"
VERSION = 2      # 2: HELLO carries the device tree, ACK the destination's figures
PREAMBLE = struct.Struct("<8sI")
HEADER = struct.Struct("<BBHII")
MAX_PAYLOAD = 16 << 20
STALL_TIMEOUT = 30.0

# Frame kinds. Source -> destination: HELLO, PAGES, STATE, END, COMMIT. Destination -> source:
# READY, ACK. Either way: ERROR (one line: why the sender gives up; the stream ends after it).
HELLO, READY, PAGES, STATE, END, ACK, COMMIT, ERROR = 1, 2, 3, 4, 5, 6, 7, 8
KIND_NAMES = {HELLO: "HELLO", READY: "READY", PAGES: "PAGES", STATE: "STATE", END: "END", ACK: "ACK",
              COMMIT: "COMMIT", ERROR: "ERROR"}


class MigrationError(UserError):
    """A migration that did not happen: one line saying why (the source's VM runs on)."""


class StreamError(MigrationError):
    """The stream broke: cut, corrupted, out of order, or the peer gave up."""


@dataclass(frozen=True)
class Address:
    """`unix:PATH` or `tcp:HOST:PORT`."""
    kind: str                  # unix | tcp
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Address("unix", path=rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isascii() and port.isdigit() and 0 <= int(port) < 65536:
            return Address("tcp", host=host.strip("[]"), port=int(port))
    raise MigrationError(f"migration address {text!r}: expected unix:PATH or tcp:HOST:PORT")


def connect(address: Address, timeout: float) -> socket.socket:
    """A connected stream socket to `address` (MigrationError in one line if none)."""
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise MigrationError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    return sock


def listen(address: Address) -> socket.socket:
    """A listening socket at `address` (a stale Unix socket file is replaced)."""
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if os.path.exists(address.path) and not os.path.isdir(address.path):
                    os.unlink(address.path)
                sock.bind(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address.host, address.port))
            except BaseException:
                sock.close()
                raise
        sock.listen(1)
    except OSError as exc:
        raise MigrationError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sock


def accept(listener: socket.socket, timeout: float | None) -> socket.socket:
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        raise MigrationError(f"no migration arrived within {timeout:.0f} s") from None
    except OSError as exc:
        raise MigrationError(f"waiting for the migration: {exc.strerror or exc}") from None
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class Channel:
    """Frames over a connected stream socket. Every failure is a StreamError in one line."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self.bytes_sent = 0
        self.bytes_received = 0
        self.deadline: float | None = None   # time.monotonic() after which a wait fails
        self.stall_timeout = STALL_TIMEOUT   # a peer that accepts or sends nothing this long is dead

    # --- sending ------------------------------------------------------------------------------

    def send_preamble(self) -> None:
        self._send_all(PREAMBLE.pack(MAGIC, VERSION))

    def send(self, kind: int, payload: bytes | bytearray | memoryview = b"", flags: int = 0) -> None:
        header = HEADER.pack(kind, flags, 0, len(payload), 0)[:8]
        crc = zlib.crc32(payload, zlib.crc32(header))
        self._send_all(header + struct.pack("<I", crc))
        if payload:
            self._send_all(payload)

    def send_json(self, kind: int, value: object) -> None:
        self.send(kind, json.dumps(value).encode())

    def send_error(self, message: str) -> None:
        """Tell the peer why we give up, if it still listens."""
        try:
            self.sock.settimeout(1.0)
            self.send(ERROR, message.encode()[:4096])
        except (OSError, MigrationError):
            pass

    def _send_all(self, data) -> None:
        self._apply_deadline()
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise StreamError(f"the migration stream to {self.peer} stalled (nothing accepted in time)") from None
        except OSError as exc:
            raise StreamError(f"the migration stream to {self.peer} broke: {exc.strerror or exc}") from None
        self.bytes_sent += len(data)

    # --- receiving ----------------------------------------------------------------------------

    def receive_preamble(self) -> None:
        magic, version = PREAMBLE.unpack(self._receive_exactly(PREAMBLE.size, "the stream's preamble"))
        if magic != MAGIC:
            raise StreamError(f"{self.peer} does not speak pyvmm's migration protocol")
        if version != VERSION:
            raise StreamError(f"{self.peer} speaks migration format version {version}; this pyvmm speaks {VERSION}")

    def receive(self) -> tuple[int, int, bytes]:
        """The next frame: (kind, flags, payload). An ERROR frame from the peer is raised."""
        header = self._receive_exactly(HEADER.size, "a frame header")
        kind, flags, _reserved, length, crc = HEADER.unpack(header)
        if kind not in KIND_NAMES or length > MAX_PAYLOAD:
            raise StreamError(f"the migration stream from {self.peer} is corrupted "
                              f"(a frame header after {self.bytes_received - HEADER.size} bytes is not valid)")
        payload = self._receive_exactly(length, f"a {KIND_NAMES[kind]} frame") if length else b""
        if zlib.crc32(payload, zlib.crc32(header[:8])) != crc:
            raise StreamError(f"the migration stream from {self.peer} is corrupted "
                              f"(a {KIND_NAMES[kind]} frame's checksum does not match)")
        if kind == ERROR:
            raise StreamError(f"{self.peer}: {payload.decode(errors='replace').strip() or 'gave up'}")
        return kind, flags, payload

    def expect(self, kind: int) -> tuple[int, bytes]:
        got, flags, payload = self.receive()
        if got != kind:
            raise StreamError(f"the migration stream from {self.peer} is out of order "
                              f"({KIND_NAMES[got]} where {KIND_NAMES[kind]} belongs)")
        return flags, payload

    def expect_json(self, kind: int) -> dict:
        _, payload = self.expect(kind)
        try:
            value = json.loads(payload)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise StreamError(f"the {KIND_NAMES[kind]} frame from {self.peer} is not a JSON object")
        return value

    def _receive_exactly(self, size: int, what: str) -> bytes:
        self._apply_deadline()
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            try:
                count = self.sock.recv_into(view[got:], size - got)
            except socket.timeout:
                raise StreamError(f"the migration stream from {self.peer} stalled while reading {what}") from None
            except OSError as exc:
                raise StreamError(f"the migration stream from {self.peer} broke: {exc.strerror or exc}") from None
            if count == 0:
                raise StreamError(f"the migration stream from {self.peer} ended in {what} "
                                  f"(after {self.bytes_received + got} bytes)")
            got += count
        self.bytes_received += size
        return bytes(buffer)

    def _apply_deadline(self) -> None:
        wait = self.stall_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise MigrationError("the migration ran out of time (--timeout)")
            wait = min(wait, left)
        self.sock.settimeout(wait)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
