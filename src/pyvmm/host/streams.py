"""Unix stream sockets behind the HostStream protocol, watched by the I/O thread."""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Callable

from ..iothread import IoThread, WritableWatch

_SUN_PATH_MAX = 108  # sockaddr_un.sun_path, with its terminating NUL


def listen_unix(path: str, *, blocking: bool = False) -> socket.socket:
    """A listening Unix stream socket at `path` (non-blocking unless asked); a stale socket
    file there is replaced, any other file refused. The file appears only once the socket
    listens (bound under a temporary name, then linked where it belongs, which never replaces
    a file): whoever waits for the path to exist and connects is not refused in between."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    flags = socket.SOCK_STREAM | socket.SOCK_CLOEXEC | (0 if blocking else socket.SOCK_NONBLOCK)
    sock = socket.socket(socket.AF_UNIX, flags)
    temporary = f"{path}.{os.getpid()}~"
    if len(os.fsencode(temporary)) >= _SUN_PATH_MAX:
        temporary = path            # no room for a longer name: bind where it belongs
    try:
        sock.bind(temporary)
        sock.listen(8)
        if temporary != path:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from None
            os.unlink(temporary)
    except OSError as exc:
        sock.close()
        if temporary != path:
            try:
                os.unlink(temporary)
            except OSError:
                pass
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
