"""The host side of virtio-console's named ports: one Unix socket per port, one client at a time."""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable

from ..iothread import IoThread, WritableWatch
from .streams import SocketStream, listen_unix

log = logging.getLogger(__name__)


class UnixPortListener:
    """Listens at `path`; `start_accepting` hands the next client over as a stream. Ports share
    one WritableWatch (`watch`) when the builder gives them one."""

    def __init__(self, path: str, iothread: IoThread, watch: WritableWatch | None = None) -> None:
        self.path = path
        self._iothread = iothread
        self._own_watch = watch is None
        self._watch = watch or WritableWatch(iothread)
        self._accepting = False
        try:
            self._listener: socket.socket | None = listen_unix(path)
        except BaseException:
            if self._own_watch:
                self._watch.close()
            raise

    def start_accepting(self, on_client: Callable[[SocketStream], None]) -> None:
        listener = self._listener
        if self._accepting or listener is None:
            return
        self._accepting = True
        self._iothread.add_reader(listener.fileno(), lambda: self._on_accept(listener, on_client))

    def stop_accepting(self) -> None:
        if self._accepting and self._listener is not None:
            self._accepting = False
            self._iothread.remove_reader(self._listener.fileno())

    def _on_accept(self, listener: socket.socket, on_client: Callable[[SocketStream], None]) -> None:
        if listener is not self._listener or not self._accepting:
            return
        try:
            client, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("console port %s: accept failed: %s", self.path, exc.strerror)
            return
        on_client(SocketStream(client, self._iothread, self._watch))

    def close(self) -> None:
        """Stop listening and remove the socket file (idempotent)."""
        self.stop_accepting()
        if self._listener is not None:
            self._iothread.call_soon(self._listener.close)
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self._own_watch:
            self._watch.close()
