"""The host side of virtio-vsock, Firecracker's Unix-socket convention:

- the guest connects to (CID 2, port P): `connect(P)` connects to the Unix socket `{uds_path}_{P}`;
- a host program connects to `uds_path` and writes "CONNECT <P>\\n": the device is asked to
  open guest port P, and once the guest accepts from local port L the program reads "OK <L>\\n".

It also keeps the streams of the device's live connections, keyed by (guest port, host port),
so a device rebuilt in the same process (a restore) continues them instead of resetting them.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..iothread import IoThread, WritableWatch
from .streams import SocketStream, listen_unix

if TYPE_CHECKING:  # the protocols this host side implements (devices never import host/)
    from ..devices.virtio.host_side import HostStream

log = logging.getLogger(__name__)

MAX_HANDSHAKES = 64            # host clients that have not sent their CONNECT line yet
CONNECT_LINE_MAX = 64
MAX_PORT = 0xFFFFFFFF

Key = tuple[int, int]


@dataclass
class VsockCarryover:
    """A host side's listener and live streams on their way to a VM that replaces its own in
    this process (a restore): the host programs connected to it notice nothing."""
    uds_path: str
    listener: socket.socket | None
    streams: dict[Key, SocketStream] = field(default_factory=dict)

    def close(self) -> None:
        """Not taken after all: close what it holds, as the old host side would have."""
        for stream in self.streams.values():
            stream.close_now()
        self.streams.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.uds_path)
            except OSError:
                pass


class VsockUnixHost:
    def __init__(self, uds_path: str, iothread: IoThread, *, carried: VsockCarryover | None = None) -> None:
        """`carried`: take over the listener and streams of the host side of a VM this one
        replaces (carry_over()) instead of listening afresh."""
        self.uds_path = uds_path
        self._iothread = iothread
        self._watch = WritableWatch(iothread)
        self._handshakes: dict[socket.socket, bytearray] = {}
        self._streams: dict[Key, SocketStream] = {}
        self._on_request: Callable[[int, SocketStream, bytes], bool] | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        if carried is not None and carried.uds_path != uds_path:
            raise ValueError(f"vsock: the carried-over host side listens at {carried.uds_path}, not {uds_path}")
        try:
            self._listener: socket.socket | None = carried.listener if carried else listen_unix(uds_path)
        except BaseException:
            self._watch.close()
            raise
        if carried is not None:
            for key, stream in carried.streams.items():
                stream.rebind(iothread, self._watch)
                self._streams[key] = stream
            carried.listener, carried.streams = None, {}

    # --- guest -> host ------------------------------------------------------------------------------

    def connect(self, host_port: int) -> SocketStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"{self.uds_path}_{host_port}")
        except OSError:  # nobody listens, or the backlog is full (EAGAIN)
            sock.close()
            raise
        return SocketStream(sock, self._iothread, self._watch)

    # --- host -> guest ------------------------------------------------------------------------------

    def start(self, on_request: Callable[[int, SocketStream, bytes], bool]) -> None:
        """Serve requests with `on_request` (a device restored in this process takes over)."""
        first = self._on_request is None
        self._on_request = on_request
        listener = self._listener
        if first and listener is not None:
            self._iothread.add_reader(listener.fileno(), lambda: self._on_accept(listener))

    def accepted(self, stream: HostStream, local_port: int) -> None:
        if stream.send(f"OK {local_port}\n".encode()) is None:   # the first bytes on a fresh socket
            raise OSError("the host program cannot take its OK line")

    def _on_accept(self, listener: socket.socket) -> None:
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
        self._iothread.add_reader(sock.fileno(), lambda: self._on_handshake(sock))

    def _drop_handshake(self, sock: socket.socket, close: bool = True) -> None:
        if self._handshakes.pop(sock, None) is not None:
            self._iothread.remove_reader(sock.fileno())
            if close:
                self._iothread.call_soon(sock.close)

    def _on_handshake(self, sock: socket.socket) -> None:
        """Read "CONNECT <port>\\n" and hand the request to the device."""
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
        if not 0 <= port <= MAX_PORT or self._on_request is None:
            self.stats["bad_connect_lines"] += 1
            self._drop_handshake(sock)
            return
        self._drop_handshake(sock, close=False)
        stream = SocketStream(sock, self._iothread, self._watch)
        if not self._on_request(port, stream, rest):
            stream.close()

    # --- live connections ------------------------------------------------------------------------------

    def adopt(self, key: Key, stream: HostStream) -> None:
        assert isinstance(stream, SocketStream)  # the device adopts only streams this host made
        self._streams[key] = stream

    def release(self, key: Key) -> None:
        self._streams.pop(key, None)

    def reclaim(self, key: Key) -> SocketStream | None:
        stream = self._streams.get(key)
        return stream if stream is not None and not stream.closed else None

    def carry_over(self) -> VsockCarryover:
        """Hand the listener and the live streams to the host side of a VM that replaces this
        one in the same process (its device was saved and detach_host() called); this object
        keeps nothing, so closing it (or its VM) leaves them alone. Handshakes not finished
        are dropped: their programs see the connection close before an OK."""
        for sock in list(self._handshakes):
            self._drop_handshake(sock)
        listener, self._listener = self._listener, None
        if listener is not None:
            self._iothread.remove_reader(listener.fileno())
        streams = {key: stream for key, stream in self._streams.items() if not stream.closed}
        for stream in streams.values():
            stream.unbind()
        self._streams.clear()
        return VsockCarryover(self.uds_path, listener, streams)

    def counters(self) -> dict[str, int]:
        return {name: self.stats[name] for name in ("handshakes_refused", "bad_connect_lines")}

    def close(self) -> None:
        """Close every stream and the listener, remove the socket file (idempotent)."""
        for stream in list(self._streams.values()):
            stream.close()
        self._streams.clear()
        for sock in list(self._handshakes):
            self._drop_handshake(sock)
        if self._listener is not None:
            self._iothread.remove_reader(self._listener.fileno())
            self._iothread.call_soon(self._listener.close)
            self._listener = None
            try:
                os.unlink(self.uds_path)
            except OSError:
                pass
        self._watch.close()
