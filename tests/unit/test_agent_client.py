"""The guest agent's host side: framing (agent/protocol.py) and the client's behaviour
against fake guests on a Unix socket that speak the vsock handshake (agent/client.py)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.agent import protocol
from pyvmm.agent.client import AgentClient, AgentError, AgentUnavailable
from pyvmm.agent.protocol import FrameReader, ProtocolError


# --- framing ------------------------------------------------------------------------------------


def test_exec_request_layout():
    data = protocol.exec_request(["echo", "hi"], {"A": "1"}, "/tmp")
    length, kind = struct.unpack_from("<IB", data)
    assert kind == protocol.EXEC and length == len(data) - 4
    assert data[5:] == struct.pack("<II", 2, 1) + b"echo\0hi\0A=1\0/tmp\0"
    assert protocol.exec_request(["true"])[5:] == struct.pack("<II", 1, 0) + b"true\0\0"


@pytest.mark.parametrize("bad", [lambda: protocol.exec_request([]),
                                 lambda: protocol.exec_request(["a\0b"]),
                                 lambda: protocol.exec_request(["a"], {"A=B": "1"}),
                                 lambda: protocol.write_request("/x", 0o10000),
                                 lambda: protocol.read_request("/a\0")])
def test_requests_that_cannot_be_encoded_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


@given(st.lists(st.tuples(st.sampled_from([protocol.STDOUT, protocol.STDERR, protocol.DATA]),
                          st.binary(max_size=300)), max_size=8),
       st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_frames_survive_any_split(frames, cuts):
    stream = b"".join(protocol.frame(kind, payload) for kind, payload in frames)
    reader, got, at, i = FrameReader(), [], 0, 0
    while at < len(stream):
        step = cuts[i % len(cuts)]
        got += reader.feed(stream[at:at + step])
        at, i = at + step, i + 1
    assert got == frames and reader.pending == 0


def test_a_bad_frame_length_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        FrameReader().feed(struct.pack("<IB", 0, 1))
    with pytest.raises(ProtocolError):
        FrameReader().feed(struct.pack("<IB", protocol.MAX_PAYLOAD + 2, 1))
    with pytest.raises(ProtocolError):
        protocol.parse_exit(b"\0" * 4)


# --- the client against fake guests -----------------------------------------------------------


class FakeVsock:
    """A vsock Unix socket whose 'guest' runs `behaviour(conn, request_frames)` per connection
    after the handshake, or refuses (closes) the first `refusals` connections."""

    def __init__(self, path, behaviour=None, *, answer=True, refusals=0):
        self.path = str(path)
        self.behaviour, self.answer, self.refusals = behaviour, answer, refusals
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.connections = 0
        self.held = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        self.connections += 1
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        assert line == f"CONNECT {protocol.AGENT_PORT}\n".encode()
        if not self.answer:
            self.held.append(conn)  # a guest without a vsock driver: never answers
            return
        if self.refusals > 0:
            self.refusals -= 1
            conn.close()            # the guest reset the connection: nobody listens yet
            return
        conn.sendall(b"OK 1073741824\n")
        self.behaviour(conn)
        conn.close()

    def close(self):
        self.listener.close()
        for conn in self.held:
            conn.close()


def _first_frame(conn) -> int:
    """The type of the first request frame on `conn`."""
    reader, frames = FrameReader(), []
    while not frames:
        frames = reader.feed(conn.recv(65536))
    return frames[0][0]


def echo_guest(conn):
    """Runs 'cat': stdin back on stdout until STDIN ends; a line on stderr; exit 3."""
    reader = FrameReader()
    request = None
    while True:
        for kind, payload in reader.feed(conn.recv(65536)):
            if kind == protocol.EXEC:
                request = payload
            elif kind == protocol.STDIN and payload:
                conn.sendall(protocol.frame(protocol.STDOUT, payload))
            elif kind == protocol.STDIN:
                conn.sendall(protocol.frame(protocol.STDERR, request[8:].split(b"\0")[0] + b" done\n"))
                conn.sendall(protocol.frame(protocol.EXIT, struct.pack("<II", 3, 0)))
                return


def test_exec_sends_stdin_and_collects_output_and_status(tmp_path):
    fake = FakeVsock(tmp_path / "v.sock", echo_guest)
    try:
        result = AgentClient(fake.path).exec(["cat"], b"x" * 200_000)
        assert result.stdout == b"x" * 200_000 and result.stderr == b"cat done\n" and result.status == 3
    finally:
        fake.close()


def test_exec_stream_reads_stdin_from_a_file_descriptor(tmp_path):
    fake = FakeVsock(tmp_path / "v.sock", echo_guest)
    read_end, write_end = os.pipe()
    os.write(write_end, b"streamed")
    os.close(write_end)
    out = []
    try:
        status = AgentClient(fake.path).exec_stream(["cat"], stdin=read_end, stdout=out.append)
        assert status == 3 and b"".join(out) == b"streamed"
    finally:
        os.close(read_end)
        fake.close()


def test_exec_stream_reads_stdin_from_a_regular_file(tmp_path):
    """`pyvmm exec VM -- cmd < file`: epoll refuses regular files (EPERM); the client polls."""
    fake = FakeVsock(tmp_path / "v.sock", echo_guest)
    (tmp_path / "input").write_bytes(b"from a file\n" * 10_000)
    out = []
    try:
        with open(tmp_path / "input", "rb") as stdin:
            status = AgentClient(fake.path).exec_stream(["cat"], stdin=stdin.fileno(), stdout=out.append)
        assert status == 3 and b"".join(out) == b"from a file\n" * 10_000
    finally:
        fake.close()


def test_errors_from_the_agent_are_one_line(tmp_path):
    def failing(conn):
        first = _first_frame(conn)
        text = b"exec nosuch" if first == protocol.EXEC else b"open /nope"
        conn.sendall(protocol.frame(protocol.ERROR, text + b": No such file or directory"))
    fake = FakeVsock(tmp_path / "v.sock", failing)
    try:
        with pytest.raises(AgentError, match="^exec nosuch: No such file or directory$"):
            AgentClient(fake.path).exec(["nosuch"])
        with pytest.raises(AgentError, match="^open /nope: No such file or directory$"):
            AgentClient(fake.path).read_file("/nope")
    finally:
        fake.close()


def test_files_go_in_chunks_and_come_back(tmp_path):
    stored = {}

    def files(conn):
        reader, got = FrameReader(), []
        while True:
            got += reader.feed(conn.recv(65536))
            if got[0][0] == protocol.READ:
                path = got[0][1].rstrip(b"\0")
                data = stored[path]
                for start in range(0, len(data), 1000):
                    conn.sendall(protocol.frame(protocol.DATA, data[start:start + 1000]))
                conn.sendall(protocol.frame(protocol.DATA))
                return
            if got[-1] == (protocol.DATA, b""):
                mode, = struct.unpack_from("<I", got[0][1])
                stored[got[0][1][4:].rstrip(b"\0")] = b"".join(p for k, p in got[1:])
                stored["mode"] = mode
                conn.sendall(protocol.frame(protocol.DONE))
                return

    fake = FakeVsock(tmp_path / "v.sock", files)
    blob = os.urandom(150_000)
    try:
        client = AgentClient(fake.path)
        client.write_file("/root/blob", blob, mode=0o600)
        assert stored[b"/root/blob"] == blob and stored["mode"] == 0o600
        assert client.read_file("/root/blob") == blob
    finally:
        fake.close()


def test_a_guest_that_never_answers_is_an_error_after_the_timeout_not_a_hang(tmp_path):
    fake = FakeVsock(tmp_path / "v.sock", answer=False)
    started = time.monotonic()
    try:
        with pytest.raises(AgentUnavailable, match="no answer from the guest on vsock port 52 within 0.5 s"):
            AgentClient(fake.path, connect_timeout=0.5).exec(["true"])
    finally:
        fake.close()
    assert time.monotonic() - started < 5


def test_a_guest_without_an_agent_refuses_and_the_client_says_so(tmp_path):
    fake = FakeVsock(tmp_path / "v.sock", refusals=1000)
    try:
        with pytest.raises(AgentUnavailable, match="refused vsock port 52 .*no guest agent is listening"):
            AgentClient(fake.path, connect_timeout=0.5).exec(["true"])
        assert fake.connections > 1, "refusals are retried until the timeout (the agent may be starting)"
    finally:
        fake.close()


def test_an_agent_that_starts_late_is_reached(tmp_path):
    fake = FakeVsock(tmp_path / "v.sock", echo_guest, refusals=3)
    try:
        assert AgentClient(fake.path, connect_timeout=5).exec(["cat"], b"late").stdout == b"late"
    finally:
        fake.close()


def test_no_socket_is_a_one_line_error(tmp_path):
    with pytest.raises(AgentUnavailable, match="no such vsock socket"):
        AgentClient(str(tmp_path / "missing.sock")).exec(["true"])


def test_a_timeout_kills_the_command(tmp_path):
    signals = []

    def sleeper(conn):
        reader = FrameReader()
        while True:
            for kind, payload in reader.feed(conn.recv(65536)):
                if kind == protocol.SIGNAL:
                    signals.append(struct.unpack("<I", payload)[0])
                    conn.sendall(protocol.frame(protocol.EXIT, struct.pack("<II", 137, 9)))
                    return
    fake = FakeVsock(tmp_path / "v.sock", sleeper)
    try:
        with pytest.raises(AgentError, match="timed out after 0.3 s: killed"):
            AgentClient(fake.path).exec(["sleep", "100"], timeout=0.3)
        assert signals == [9]
    finally:
        fake.close()


# --- the command line's argument handling (no VM needed) ---------------------------------------


def test_cp_tells_guest_paths_from_host_paths():
    from pyvmm.manage.agent_cli import _guest_side

    assert _guest_side(":/etc/hostname", "/run/v.sock") == ("/run/v.sock", "/etc/hostname")
    assert _guest_side("./local:file", "/run/v.sock") is None       # a host path with a colon
    assert _guest_side("plain.txt", None) is None
    assert _guest_side("web:/etc/hostname", "/run/v.sock") is None  # with --vsock, guest paths are :PATH


def test_exec_and_cp_argument_errors_are_one_line(tmp_path, capsys):
    from pyvmm.cli import main

    assert main(["exec", "--vsock", str(tmp_path / "v.sock")]) == 2
    assert main(["exec", "--", "true"]) == 2
    assert main(["cp", "--vsock", str(tmp_path / "v.sock"), "a", "b"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["pyvmm: error: exec: no command given (pyvmm exec VM -- COMMAND, or --vsock UDS -- COMMAND)",
                     "pyvmm: error: name a managed VM or give --vsock UDS (one of the two)",
                     "pyvmm: error: cp: exactly one of SRC and DST must be a guest path (VM:PATH, or :PATH with --vsock)"]


# --- identity (a guest restored from a snapshot makes itself its own) ------------------------------


def test_identity_request_layout():
    data = protocol.identity_request(1_700_000_000, 123_456_789, "0123456789abcdef" * 2, b"\x01\x02")
    length, kind = struct.unpack_from("<IB", data)
    assert kind == protocol.IDENTITY and length == len(data) - 4
    assert data[5:] == struct.pack("<QI", 1_700_000_000, 123_456_789) + b"0123456789abcdef" * 2 + b"\0\x01\x02"


@pytest.mark.parametrize("seconds, nanoseconds, machine_id, entropy", [
    (-1, 0, "a" * 32, b""), (0, 1_000_000_000, "a" * 32, b""), (0, 0, "A" * 32, b""), (0, 0, "a" * 31, b""),
    (0, 0, "g" * 32, b""), (0, 0, "a" * 32, bytes(protocol.MAX_ENTROPY + 1))])
def test_identity_requests_that_cannot_be_encoded_are_refused(seconds, nanoseconds, machine_id, entropy):
    with pytest.raises(ValueError):
        protocol.identity_request(seconds, nanoseconds, machine_id, entropy)


def test_new_machine_ids_are_fresh_uuid4_hex():
    from pyvmm.agent import new_machine_id

    ids = {new_machine_id() for _ in range(50)}
    assert len(ids) == 50
    for machine_id in ids:
        assert len(machine_id) == 32 and set(machine_id) <= set("0123456789abcdef") and machine_id[12] == "4"


def test_set_identity_sends_now_the_machine_id_and_host_entropy(tmp_path):
    got = []

    def guest(conn):
        reader, frames = FrameReader(), []
        while not frames:
            frames = reader.feed(conn.recv(65536))
        got.append(frames[0])
        conn.sendall(protocol.frame(protocol.DONE))

    fake = FakeVsock(tmp_path / "v.sock", guest)
    try:
        client = AgentClient(fake.path)
        before = time.time_ns()
        client.set_identity("ab" * 16)
        after = time.time_ns()
        client.set_identity("cd" * 16, now_ns=5_000_000_007, entropy=b"seed")
    finally:
        fake.close()
    (kind, first), (_, second) = got
    assert kind == protocol.IDENTITY
    seconds, nanoseconds = struct.unpack_from("<QI", first)
    assert before <= seconds * 1_000_000_000 + nanoseconds <= after
    assert first[12:45] == b"ab" * 16 + b"\0" and len(first[45:]) == 64   # 64 bytes of host entropy
    assert second == struct.pack("<QI", 5, 7) + b"cd" * 16 + b"\0seed"


def test_set_identity_on_an_agent_that_does_not_know_it_is_one_line(tmp_path):
    fake = FakeVsock(tmp_path / "v.sock", lambda conn: _first_frame(conn))   # closes unanswered
    try:
        with pytest.raises(AgentError, match="without applying the identity .*pyvmm image build"):
            AgentClient(fake.path).set_identity("ab" * 16)
    finally:
        fake.close()
    failing = FakeVsock(tmp_path / "w.sock", lambda conn: (_first_frame(conn), conn.sendall(
        protocol.frame(protocol.ERROR, b"set CLOCK_REALTIME: Operation not permitted"))))
    try:
        with pytest.raises(AgentError, match="^guest agent: identity: set CLOCK_REALTIME: Operation not permitted$"):
            AgentClient(failing.path).set_identity("ab" * 16)
    finally:
        failing.close()


def test_exec_with_identity_sends_it_first_on_the_same_connection(tmp_path):
    got = []

    def guest(conn):
        reader, frames = FrameReader(), []
        while len(frames) < 3:
            frames += reader.feed(conn.recv(65536))
        got.extend(frames)
        conn.sendall(protocol.frame(protocol.DONE) + protocol.frame(protocol.STDOUT, b"ran")
                     + protocol.frame(protocol.EXIT, struct.pack("<II", 0, 0)))

    fake = FakeVsock(tmp_path / "v.sock", guest)
    out = []
    try:
        assert AgentClient(fake.path).exec_stream(["true"], identity="ef" * 16, stdout=out.append) == 0
    finally:
        fake.close()
    assert [kind for kind, _ in got] == [protocol.IDENTITY, protocol.EXEC, protocol.STDIN]
    assert got[0][1][12:45] == b"ef" * 16 + b"\0" and b"".join(out) == b"ran"
    failing = FakeVsock(tmp_path / "w.sock", lambda conn: (_first_frame(conn), conn.sendall(
        protocol.frame(protocol.ERROR, b"set CLOCK_REALTIME: Operation not permitted"))))
    try:
        with pytest.raises(AgentError, match="^guest agent: identity: set CLOCK_REALTIME"):
            AgentClient(failing.path).exec_stream(["true"], identity="ef" * 16)
    finally:
        failing.close()


def test_exec_stream_reads_an_unpollable_stdin_whole(tmp_path):
    fake = FakeVsock(tmp_path / "v.sock", echo_guest)
    source = tmp_path / "in.txt"
    source.write_bytes(b"from a file")
    out = []
    try:
        with open(source, "rb") as stdin:       # epoll refuses regular files
            assert AgentClient(fake.path).exec_stream(["cat"], stdin=stdin, stdout=out.append) == 3
    finally:
        fake.close()
    assert b"".join(out) == b"from a file"


def test_a_timeout_is_its_own_error(tmp_path):
    from pyvmm.agent import AgentTimeout

    def slow(conn):
        reader = FrameReader()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for kind, payload in reader.feed(data):
                if kind == protocol.SIGNAL:
                    conn.sendall(protocol.frame(protocol.EXIT, struct.pack("<II", 137, 9)))
                    return

    fake = FakeVsock(tmp_path / "v.sock", slow)
    try:
        with pytest.raises(AgentTimeout, match="timed out after 0.3 s: killed"):
            AgentClient(fake.path).exec(["sleep", "9"], timeout=0.3)
    finally:
        fake.close()
