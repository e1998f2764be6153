"""The host side of the guest agent: run commands in a guest and copy files, over vsock.

    client = AgentClient("/tmp/vm.vsock")           # the VM's vsock Unix socket (--vsock uds=)
    result = client.exec(["uname", "-r"])            # ExecResult(stdout, stderr, status)
    status = client.exec_stream(["sh"], stdin=sys.stdin.buffer, stdout=sys.stdout.buffer.write)
    client.write_file("/tmp/f", b"data"); client.read_file("/tmp/f")
    client.set_identity(new_machine_id())              # a restored guest: clock, machine id, RNG

Every call opens its own connection (protocol.py). A guest that does not answer - no agent
listening, no vsock driver, a guest still booting past `connect_timeout` - is an
AgentUnavailable error with one line saying which, never a hang.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Callable

from ..errors import UserError
from . import protocol
from .protocol import AGENT_PORT, CHUNK, FrameReader, ProtocolError

CONNECT_TIMEOUT = 10.0
RETRY_INTERVAL = 0.1
OUTGOING_LIMIT = 4 * CHUNK    # stdin buffered on the host before more of it is read


class AgentError(UserError):
    """The agent answered with an error (exec failed, no such file ...), or broke the protocol."""


class AgentTimeout(AgentError):
    """A command ran past its timeout and was killed."""


class AgentUnavailable(AgentError):
    """No agent answered on the guest's vsock port."""


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    status: int        # the exit code, or 128 + the signal that killed the command
    signal: int = 0    # the signal, 0 when the command exited


class AgentClient:
    def __init__(self, uds_path: str, *, port: int = AGENT_PORT, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        """`uds_path`: the Unix socket of the VM's vsock device (Firecracker's uds_path)."""
        self.uds_path = uds_path
        self.port = port
        self.connect_timeout = connect_timeout

    # --- connection ----------------------------------------------------------------------------

    def connect(self) -> socket.socket:
        """A stream to the agent: CONNECT through the vsock socket, retried while the guest
        refuses (its agent may still be starting) until `connect_timeout`."""
        deadline = time.monotonic() + self.connect_timeout
        refused = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    sock.connect(self.uds_path)
                except FileNotFoundError:
                    raise AgentUnavailable(f"{self.uds_path}: no such vsock socket (is the VM running with a vsock device?)") from None
                except ConnectionRefusedError:
                    raise AgentUnavailable(f"{self.uds_path}: nothing listens there (has the VM stopped?)") from None
                sock.sendall(f"CONNECT {self.port}\n".encode())
                line = _read_line(sock)
                if line.startswith(b"OK "):
                    sock.settimeout(None)
                    return sock
                refused = True   # the guest reset the connection: no listener on the port (yet)
            except socket.timeout:
                sock.close()
                what = ("the guest kept refusing vsock port" if refused else "no answer from the guest on vsock port")
                raise AgentUnavailable(f"{what} {self.port} within {self.connect_timeout:g} s: is the guest "
                                       f"agent running (and the guest's vsock driver loaded)?") from None
            except OSError as exc:
                sock.close()
                raise AgentUnavailable(f"{self.uds_path}: {exc.strerror or exc}") from None
            sock.close()
            if time.monotonic() + RETRY_INTERVAL >= deadline:
                raise AgentUnavailable(f"the guest refused vsock port {self.port} for {self.connect_timeout:g} s: "
                                       f"no guest agent is listening")
            time.sleep(RETRY_INTERVAL)

    # --- commands ------------------------------------------------------------------------------

    def exec(self, argv: list[str], stdin: bytes = b"", *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None) -> ExecResult:
        """Run `argv` in the guest with `stdin`; its whole output and exit status. `timeout`:
        seconds before the command is killed (SIGKILL; status 137) and AgentTimeout raised."""
        out, err = bytearray(), bytearray()
        source = _BytesSource(stdin)
        exit_ = self._run(argv, source, out.extend, err.extend, env=env, cwd=cwd, timeout=timeout)
        return ExecResult(bytes(out), bytes(err), exit_.status, exit_.signal)

    def exec_stream(self, argv: list[str], *, stdin: BinaryIO | int | bytes | None = None,
                    stdout: Callable[[bytes], object] | None = None, stderr: Callable[[bytes], object] | None = None,
                    env: dict[str, str] | None = None, cwd: str | None = None,
                    timeout: float | None = None, identity: str | None = None) -> int:
        """Run `argv`, streaming: stdin read from a file or fd as the command runs (None: closed
        at once; bytes: those), stdout/stderr chunks handed to the callables as they come. Its exit
        status. A file or fd that cannot be polled (a regular file, /dev/null) is read whole first.
        `identity`: a machine id; the guest first takes its identity as set_identity() gives it,
        on the same connection (one round trip less for a guest just restored)."""
        source: _BytesSource | _FdSource
        if stdin is None or isinstance(stdin, (bytes, bytearray)):
            source = _BytesSource(bytes(stdin or b""))
        else:
            fd = stdin if isinstance(stdin, int) else stdin.fileno()
            source = _FdSource(fd) if _pollable(fd) else _BytesSource(_read_all(fd))
        exit_ = self._run(argv, source, stdout or (lambda data: None), stderr or (lambda data: None),
                          env=env, cwd=cwd, timeout=timeout, identity=identity)
        return exit_.status

    def _run(self, argv, source, on_stdout, on_stderr, *, env, cwd, timeout, identity=None) -> protocol.Exit:
        """One EXEC: stdin goes out as the socket takes it while output comes in, so neither
        side ever waits for the other with both buffers full. With `identity`, an IDENTITY
        request goes first on the same connection, and its DONE comes before the command's output."""
        request = protocol.exec_request(list(argv), env, cwd)
        pending = [_identity_request(identity)] if identity is not None else []
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.connect()
        outgoing = bytearray(b"".join(pending) + request)
        killed, sending = False, True
        # poll(2), not epoll: stdin may be a regular file (`pyvmm exec VM -- cmd < file`), which
        # epoll refuses (EPERM) and poll reports always readable
        selector = selectors.PollSelector()
        reader = FrameReader()
        try:
            sock.setblocking(False)
            while True:
                if sending and len(outgoing) < OUTGOING_LIMIT:
                    outgoing += source.more()   # b"" when it has nothing now (or nothing left)
                _register(selector, sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if sending and outgoing else 0))
                if source.fd is not None:
                    wanted = sending and not source.ended and len(outgoing) < OUTGOING_LIMIT
                    _register(selector, source.fd, selectors.EVENT_READ if wanted else 0)
                wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                events = selector.select(wait)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    if killed:
                        raise AgentTimeout(f"{argv[0]}: timed out after {timeout:g} s, and the guest did not "
                                           f"confirm the kill")
                    outgoing += protocol.signal_request(9)   # SIGKILL the command's process group
                    sending = killed = True
                    deadline = time.monotonic() + self.connect_timeout   # for the EXIT that follows
                    continue
                for key, mask in events:
                    if key.fileobj is not sock:
                        source.readable()
                        continue
                    if mask & selectors.EVENT_WRITE:
                        try:
                            del outgoing[:sock.send(outgoing)]
                        except BlockingIOError:
                            pass
                        except (BrokenPipeError, ConnectionResetError):
                            sending = False   # the agent stopped reading: its answer is what matters
                    if mask & selectors.EVENT_READ:
                        exit_ = self._take_output(sock, reader, argv, on_stdout, on_stderr, pending)
                        if exit_ is not None:
                            if killed:
                                raise AgentTimeout(f"{argv[0]}: timed out after {timeout:g} s: killed")
                            return exit_
        except ProtocolError as exc:
            raise AgentError(f"guest agent: {exc}") from None
        finally:
            selector.close()
            sock.close()

    @staticmethod
    def _take_output(sock, reader, argv, on_stdout, on_stderr, pending: list) -> protocol.Exit | None:
        try:
            data = sock.recv(CHUNK * 4)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            data = b""
        if not data:
            raise AgentError(f"{argv[0]}: the guest agent closed the connection before the command ended")
        for kind, payload in reader.feed(data):
            if pending:          # the identity's answer comes first
                pending.clear()
                if kind == protocol.ERROR:
                    raise AgentError(f"guest agent: identity: {payload.decode(errors='replace')}")
                if kind != protocol.DONE:
                    raise ProtocolError(f"unexpected frame type {kind} answering an identity request")
                continue
            if kind == protocol.STDOUT:
                on_stdout(payload)
            elif kind == protocol.STDERR:
                on_stderr(payload)
            elif kind == protocol.EXIT:
                return protocol.parse_exit(payload)
            elif kind == protocol.ERROR:
                raise AgentError(payload.decode(errors="replace"))
            else:
                raise ProtocolError(f"unexpected frame type {kind} during exec")
        return None

    # --- files ---------------------------------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        """The contents of `path` in the guest."""
        sock = self.connect()
        try:
            sock.sendall(protocol.read_request(path))
            contents = bytearray()
            for kind, payload in _frames(sock):
                if kind == protocol.DATA:
                    if not payload:
                        return bytes(contents)
                    contents += payload
                elif kind == protocol.ERROR:
                    raise AgentError(payload.decode(errors="replace"))
                else:
                    raise AgentError(f"guest agent: unexpected frame type {kind} reading {path}")
            raise AgentError(f"{path}: the guest agent closed the connection mid-file")
        finally:
            sock.close()

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace `path` in the guest with `data` (fsync'ed before this returns)."""
        sock = self.connect()
        try:
            sock.sendall(protocol.write_request(path, mode))
            for start in range(0, len(data), CHUNK):
                sock.sendall(protocol.frame(protocol.DATA, data[start:start + CHUNK]))
            sock.sendall(protocol.frame(protocol.DATA))
            for kind, payload in _frames(sock):
                if kind == protocol.DONE:
                    return
                if kind == protocol.ERROR:
                    raise AgentError(payload.decode(errors="replace"))
                raise AgentError(f"guest agent: unexpected frame type {kind} writing {path}")
            raise AgentError(f"{path}: the guest agent closed the connection before confirming the write")
        finally:
            sock.close()


    # --- identity ------------------------------------------------------------------------------

    def set_identity(self, machine_id: str, *, now_ns: int | None = None, entropy: bytes | None = None) -> None:
        """Make a guest restored from a snapshot its own: reseed its kernel's random pool with
        `entropy` (default: 64 fresh bytes from the host), set its wall clock to `now_ns`
        (default: the host's time.time_ns() as the request leaves) and write `machine_id`
        (32 lowercase hex digits) to /etc/machine-id. Returns once the agent applied all three."""
        sock = self.connect()
        try:
            sock.sendall(_identity_request(machine_id, now_ns, entropy))
            for kind, payload in _frames(sock):
                if kind == protocol.DONE:
                    return
                if kind == protocol.ERROR:
                    raise AgentError(f"guest agent: identity: {payload.decode(errors='replace')}")
                raise AgentError(f"guest agent: unexpected frame type {kind} answering an identity request")
            raise AgentError("guest agent: closed the connection without applying the identity "
                             "(an agent from an image built before identity requests? run `pyvmm image build`)")
        finally:
            sock.close()


    def set_mac_addresses(self, changes: dict[str, str], *, timeout: float = 30) -> None:
        """Make the guest's interfaces use new MAC addresses: each interface whose address is a
        key of `changes` gets the value (`ip link set dev IF address NEW`, which Linux's
        virtio-net applies on a live interface). A clone's NICs offer their new MAC in config
        space, but a guest reads that only when its driver probes: one restored from a snapshot
        goes on sending from the old one until told here. AgentError (one line) if an address
        is on no interface or cannot be set."""
        argv = ["sh", "-c", _SET_MACS, "set-macs"]
        for old, new in changes.items():
            argv += [_mac(old), _mac(new)]
        result = self.exec(argv, timeout=timeout)
        if result.status != 0:
            message = result.stderr.decode(errors="replace").strip().splitlines()
            raise AgentError(f"guest agent: setting MAC addresses: {message[-1] if message else f'status {result.status}'}")


# Pairs OLD NEW as arguments: each interface with address OLD gets NEW.
_SET_MACS = r"""
while [ $# -gt 1 ]; do
  found=
  for dev in /sys/class/net/*; do
    [ "$(cat "$dev/address" 2>/dev/null)" = "$1" ] || continue
    ip link set dev "${dev##*/}" address "$2" || exit 1
    found=1
  done
  [ -n "$found" ] || { echo "no interface has MAC address $1" >&2; exit 1; }
  shift 2
done
"""


def _mac(text: str) -> str:
    """`text` as the guest's /sys/class/net/*/address spells a MAC (ValueError if it is none)."""
    parts = text.lower().split(":")
    if len(parts) != 6 or not all(len(part) == 2 and all(c in "0123456789abcdef" for c in part) for part in parts):
        raise ValueError(f"{text!r} is not a MAC address")
    return ":".join(parts)


def _identity_request(machine_id: str, now_ns: int | None = None, entropy: bytes | None = None) -> bytes:
    """IDENTITY with the host's time as it leaves (unless `now_ns`) and 64 fresh bytes of host
    entropy (unless `entropy`)."""
    seconds, nanoseconds = divmod(time.time_ns() if now_ns is None else now_ns, 1_000_000_000)
    return protocol.identity_request(seconds, nanoseconds, machine_id, os.urandom(64) if entropy is None else entropy)


def new_machine_id() -> str:
    """A fresh machine id: a random (version 4) UUID as 32 lowercase hex digits, as systemd
    generates them (machine-id(5))."""
    return uuid.uuid4().hex


class _BytesSource:
    """Stdin given as bytes: STDIN frames a chunk at a time, then the empty one."""
    fd = None
    ended = True

    def __init__(self, data: bytes) -> None:
        self._data, self._at, self._done = data, 0, False

    def more(self) -> bytes:
        if self._done:
            return b""
        chunk = self._data[self._at:self._at + CHUNK]
        self._at += len(chunk)
        self._done = not chunk
        return protocol.frame(protocol.STDIN, chunk)

    def readable(self) -> None:
        pass


class _FdSource:
    """Stdin read from a file descriptor as it becomes readable; its end sends the empty STDIN."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ended = False
        self._ready = b""

    def readable(self) -> None:
        try:
            data = os.read(self.fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.ended = not data
        self._ready += protocol.frame(protocol.STDIN, data)

    def more(self) -> bytes:
        ready, self._ready = self._ready, b""
        return ready


def _pollable(fd: int) -> bool:
    """Whether epoll can watch `fd` (it refuses regular files and /dev/null with EPERM)."""
    with select.epoll() as probe:
        try:
            probe.register(fd, select.EPOLLIN)
        except PermissionError:
            return False
    return True


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _register(selector: selectors.BaseSelector, fileobj, mask: int) -> None:
    """(Re)register `fileobj` for `mask`; 0 unregisters it."""
    try:
        selector.get_key(fileobj)
    except KeyError:
        if mask:
            selector.register(fileobj, mask)
        return
    if mask:
        selector.modify(fileobj, mask)
    else:
        selector.unregister(fileobj)


def _frames(sock: socket.socket):
    reader = FrameReader()
    while True:
        data = sock.recv(CHUNK * 4)
        if not data:
            return
        try:
            yield from reader.feed(data)
        except ProtocolError as exc:
            raise AgentError(f"guest agent: {exc}") from None


def _read_line(sock: socket.socket) -> bytes:
    """The handshake's answer line, read a byte at a time so no frame bytes are taken with it."""
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < 64:
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)
