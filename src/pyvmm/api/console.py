"""The console of a VM that runs in the background: history, and terminals that come and go.

Guest output is appended to a history file (so a late `pyvmm console`, or a user with `tail`,
sees what was printed) and to a ring of the last bytes in memory, and copied to every
attached terminal. Terminals attach over a Unix socket (mode 0600): a client sends one line,
``attach REPLAY\\n``, gets ``ok N\\n`` and the last N (at most REPLAY) bytes of history, then
the live output; what it sends after its line goes to the guest's console device. Nothing a client does can block
the vCPU thread that writes output: each client has its own queue and sender thread, and a
client that falls too far behind is dropped.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from pathlib import Path

log = logging.getLogger(__name__)

RING_BYTES = 256 << 10           # history served to attaching terminals
HISTORY_FILE_BYTES = 4 << 20     # the file is rotated to NAME.1 past this size
CLIENT_BACKLOG = 1024            # chunks queued for one slow client before it is dropped


class ConsoleHub:
    def __init__(self, history_path: str | os.PathLike | None = None) -> None:
        self._lock = threading.Lock()
        self._ring = bytearray()
        self.total_bytes = 0
        self._history_path = Path(history_path) if history_path is not None else None
        self._history_fd = -1
        self._history_size = 0
        if self._history_path is not None:
            self._open_history()
        self._clients: list[_Client] = []
        self._port = None                 # the guest's console device (UART or virtio-console)
        self._port_ready = threading.Condition(self._lock)
        self._server: socket.socket | None = None
        self._closing = False

    # --- guest -> host ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Called by the device (a vCPU or the I/O thread) with each piece of guest output."""
        with self._lock:
            self.total_bytes += len(data)
            self._ring += data
            if len(self._ring) > RING_BYTES:
                del self._ring[:len(self._ring) - RING_BYTES]
            if self._history_fd >= 0:
                self._append_history(data)
            for client in list(self._clients):
                if not client.send(data):
                    self._clients.remove(client)

    def history(self, tail: int | None = None) -> bytes:
        with self._lock:
            return bytes(self._ring if tail is None else self._ring[-tail:] if tail else b"")

    def _open_history(self) -> None:
        assert self._history_path is not None
        self._history_fd = os.open(self._history_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._history_size = os.fstat(self._history_fd).st_size

    def _append_history(self, data: bytes) -> None:
        try:
            if self._history_size + len(data) > HISTORY_FILE_BYTES and self._history_path is not None:
                os.close(self._history_fd)
                os.replace(self._history_path, f"{self._history_path}.1")
                self._open_history()
            os.write(self._history_fd, data)
            self._history_size += len(data)
        except OSError as exc:
            log.warning("console history stopped: %s", exc)
            os.close(self._history_fd)
            self._history_fd = -1

    # --- host -> guest ------------------------------------------------------------------

    def attach_port(self, port) -> None:
        """The console device input goes to (again after a reboot, which builds a new one)."""
        with self._lock:
            self._port = port
            self._port_ready.notify_all()

    def deliver(self, data: bytes) -> None:
        """Hand `data` to the guest without overrunning its receive FIFO."""
        while data and not self._closing:
            with self._lock:
                while self._port is None and not self._closing:
                    self._port_ready.wait(0.5)
                port = self._port
            if port is None:
                return
            space = port.rx_space()
            if space == 0:
                port.wait_rx_space(0.1)  # short: a reboot's new port or a close is noticed
                continue
            port.receive(data[:space])
            data = data[space:]

    # --- the attach socket --------------------------------------------------------------

    def serve(self, path: str | os.PathLike) -> None:
        """Listen for terminals on the Unix socket `path` (created mode 0600)."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old_umask)
        server.listen(8)
        self._server = server
        threading.Thread(target=self._accept_main, args=(server,), name="console-accept", daemon=True).start()

    def _accept_main(self, server: socket.socket) -> None:
        while not self._closing:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._client_main, args=(conn,), name="console-client", daemon=True).start()

    def _client_main(self, conn: socket.socket) -> None:
        try:
            header = b""
            while b"\n" not in header and len(header) < 64:
                chunk = conn.recv(64 - len(header))
                if not chunk:
                    return
                header += chunk
            line, _, rest = header.partition(b"\n")
            words = line.split()
            if len(words) != 2 or words[0] != b"attach" or not words[1].isdigit():
                conn.sendall(b"pyvmm: expected 'attach REPLAY_BYTES'\n")
                return
            client = _Client(conn)
            with self._lock:  # history and registration at once: no byte lost or repeated
                replay = bytes(self._ring[-int(words[1]):]) if int(words[1]) else b""
                client.send(b"ok %d\n" % len(replay) + replay)
                self._clients.append(client)
            if rest:
                self.deliver(rest)
            while not self._closing:
                data = conn.recv(4096)
                if not data:
                    break
                self.deliver(data)
        except OSError:
            pass
        finally:
            with self._lock:
                gone = [c for c in self._clients if c.conn is conn]
                self._clients = [c for c in self._clients if c.conn is not conn]
            for client in gone:
                client.close()
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._port_ready.notify_all()
            clients, self._clients = self._clients, []
            if self._history_fd >= 0:
                os.close(self._history_fd)
                self._history_fd = -1
        for client in clients:
            client.close()
        if self._server is not None:
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()


class _Client:
    """One attached terminal: output goes through a queue and a thread of its own."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self._queue: queue.Queue[bytes | None] = queue.Queue(CLIENT_BACKLOG)
        threading.Thread(target=self._send_main, name="console-send", daemon=True).start()

    def send(self, data: bytes) -> bool:
        """Queue `data`; False when the client is too far behind (it is then disconnected)."""
        if not data:
            return True
        try:
            self._queue.put_nowait(data)
            return True
        except queue.Full:
            self.close()
            return False

    def close(self) -> None:
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._queue.put_nowait(None)  # ends the sender (a full queue ends it by the shutdown)
        except queue.Full:
            pass

    def _send_main(self) -> None:
        try:
            while (data := self._queue.get()) is not None:
                self.conn.sendall(data)
        except OSError:
            pass
        finally:
            self.conn.close()
