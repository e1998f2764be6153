"""Unix stream sockets behind the HostStream protocol, watched by the I/O thread."""

from __future__ import annotations

import os
import socket
import stat
from typing import Callable

from ..iothread import IoThread, WritableWatch


def listen_unix(path: str) -> socket.socket:
    """A non-blocking listening Unix stream socket at `path`; a stale socket file there is replaced."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(8)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen here: {exc.strerror}", path) from None
    return sock


class SocketStream:
    """A connected, non-blocking socket; readable/writable callbacks run on the I/O thread."""

    def __init__(self, sock: socket.socket, iothread: IoThread, writable: WritableWatch) -> None:
        sock.setblocking(False)
        self._sock, self._iothread, self._writable = sock, iothread, writable
        self._fd = sock.fileno()
        self._reading = False
        self.closed = False

    def recv(self, limit: int) -> bytes | None:
        try:
            return self._sock.recv(limit)
        except (BlockingIOError, InterruptedError):
            return None

    def send(self, data: bytes | bytearray) -> int | None:
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return None

    def shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def watch_readable(self, callback: Callable[[], None]) -> None:
        if self._reading:
            self._iothread.remove_reader(self._fd)
        self._reading = True
        self._iothread.add_reader(self._fd, callback)

    def unwatch_readable(self) -> None:
        if self._reading:
            self._reading = False
            self._iothread.remove_reader(self._fd)

    def watch_writable(self, callback: Callable[[], None]) -> None:
        self._writable.watch(self._fd, callback)

    def unbind(self) -> None:
        """Stop watching the socket from this I/O thread (it moves to another: rebind())."""
        self.unwatch_readable()
        self._writable.forget(self._fd)

    def rebind(self, iothread: IoThread, writable: WritableWatch) -> None:
        """Be watched from `iothread` from now on (after unbind())."""
        self._iothread, self._writable = iothread, writable

    def close_now(self) -> None:
        """Close an unbound stream (no I/O thread watches it)."""
        if not self.closed:
            self.closed = True
            self._sock.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.unwatch_readable()
        self._writable.forget(self._fd)
        self._iothread.call_soon(self._sock.close)   # after the I/O thread dropped the fd
