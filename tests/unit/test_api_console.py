"""The console hub of a managed VM: history ring and file, attach with replay, input to the
guest's port without overrunning it, rotation of the history file."""

from __future__ import annotations

import socket
import threading

import pytest

from pyvmm.api import console as console_module
from pyvmm.api.console import ConsoleHub


class FakePort:
    """A UART's receive side: a FIFO of `size` bytes the test drains."""

    def __init__(self, size: int = 16) -> None:
        self.size, self.fifo, self.received = size, bytearray(), bytearray()
        self.space = threading.Condition()

    def rx_space(self) -> int:
        with self.space:
            return self.size - len(self.fifo)

    def receive(self, data: bytes) -> None:
        with self.space:
            assert len(self.fifo) + len(data) <= self.size, "overran the FIFO"
            self.fifo += data

    def wait_rx_space(self, timeout: float) -> None:
        with self.space:
            self.space.wait_for(lambda: len(self.fifo) < self.size, timeout)

    def drain(self) -> None:
        with self.space:
            self.received += self.fifo
            self.fifo.clear()
            self.space.notify_all()


def attach(path, replay: int) -> tuple[socket.socket, bytes]:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(path))
    conn.sendall(b"attach %d\n" % replay)
    conn.settimeout(10)
    header = b""
    while not header.endswith(b"\n"):
        header += conn.recv(1)
    length = int(header.split()[1])
    data = b""
    while len(data) < length:
        data += conn.recv(length - len(data))
    return conn, data


def recv_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        assert chunk
        data += chunk
    return data


def test_history_file_ring_and_replay(tmp_path):
    hub = ConsoleHub(tmp_path / "console.log")
    hub.serve(tmp_path / "console.sock")
    try:
        hub.write(b"boot line 1\n")
        hub.write(b"prompt# ")
        assert hub.history() == b"boot line 1\nprompt# " and hub.history(tail=8) == b"prompt# "
        assert (tmp_path / "console.log").read_bytes() == b"boot line 1\nprompt# "
        conn, replay = attach(tmp_path / "console.sock", 8)
        assert replay == b"prompt# "
        hub.write(b"live")
        assert recv_exactly(conn, 4) == b"live"
        conn.close()
        _, nothing = attach(tmp_path / "console.sock", 0)
        assert nothing == b""
    finally:
        hub.close()


def test_input_waits_for_room_in_the_guests_fifo(tmp_path):
    hub = ConsoleHub()
    hub.serve(tmp_path / "console.sock")
    port = FakePort(size=4)
    hub.attach_port(port)
    try:
        conn, _ = attach(tmp_path / "console.sock", 0)
        conn.sendall(b"echo hello\n")
        while len(port.received) + len(port.fifo) < 11:
            port.wait_rx_space(0.05)
            port.drain()  # the guest reads: what FakePort.receive asserts is that it is never overrun
        port.drain()
        assert bytes(port.received) == b"echo hello\n"
        conn.close()
    finally:
        hub.close()


def test_a_malformed_attach_line_is_refused(tmp_path):
    hub = ConsoleHub()
    hub.serve(tmp_path / "console.sock")
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(tmp_path / "console.sock"))
            conn.sendall(b"hello\n")
            conn.settimeout(10)
            assert conn.recv(100).startswith(b"pyvmm: expected 'attach")
    finally:
        hub.close()


def test_history_file_rotates(tmp_path, monkeypatch):
    monkeypatch.setattr(console_module, "HISTORY_FILE_BYTES", 10)
    hub = ConsoleHub(tmp_path / "console.log")
    hub.write(b"0123456789")
    hub.write(b"abc")
    hub.close()
    assert (tmp_path / "console.log.1").read_bytes() == b"0123456789"
    assert (tmp_path / "console.log").read_bytes() == b"abc"


def test_a_client_that_does_not_read_is_dropped_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(console_module, "CLIENT_BACKLOG", 4)
    hub = ConsoleHub()
    hub.serve(tmp_path / "console.sock")
    try:
        conn, _ = attach(tmp_path / "console.sock", 0)
        hub.write(b"ping")
        assert recv_exactly(conn, 4) == b"ping"  # registered: output reaches it
        for _ in range(2000):  # far more than the socket buffer and the backlog hold
            hub.write(b"x" * 4096)
        assert hub._clients == []  # the writer never blocked, and the laggard is gone
        conn.close()
    finally:
        hub.close()


@pytest.mark.parametrize("replay", [0, 5, 1000])
def test_replay_is_at_most_what_was_printed(tmp_path, replay):
    hub = ConsoleHub()
    hub.serve(tmp_path / "console.sock")
    try:
        hub.write(b"12345678")
        _, data = attach(tmp_path / "console.sock", replay)
        assert data == b"12345678"[-replay:] if replay else data == b""
    finally:
        hub.close()
