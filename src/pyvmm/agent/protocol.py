"""The guest agent's wire protocol: framed messages over one vsock stream per request.

The default guest runs `pyvmm-agent` (images/agent.c), listening on vsock port
AGENT_PORT. The host reaches it through pyvmm's vsock device the Firecracker way: connect
to the VM's vsock Unix socket, write ``CONNECT 52\\n``, read ``OK <port>\\n``; from then on
the stream carries frames:

    u32 little-endian N (the length of what follows), u8 type, N - 1 bytes of payload

Each connection carries one request; the guest serves each in its own process, so
requests run concurrently. Integers are little-endian u32; strings are NUL-terminated.

Host -> guest
    EXEC    (1)  u32 argc, u32 envc, argc args, envc "NAME=VALUE", cwd ("" = the agent's, /)
    STDIN   (2)  bytes for the command's stdin; an empty STDIN closes it
    SIGNAL  (6)  u32 signal number, sent to the command's process group
    READ    (3)  path
    WRITE   (4)  u32 mode, path; then DATA frames, an empty DATA ends the file
    DATA    (5)  file contents
    IDENTITY (7) u64 seconds, u32 nanoseconds (the wall clock to set), machine id (32 lowercase
                 hex digits), then up to MAX_ENTROPY bytes of host entropy: what a guest restored
                 from a snapshot makes its own. The agent credits the entropy to the kernel's
                 random pool and reseeds its CRNG (RNDADDENTROPY, RNDRESEEDCRNG), sets
                 CLOCK_REALTIME and replaces /etc/machine-id. After its DONE the same
                 connection may carry one more request (EXEC, READ or WRITE)
Guest -> host
    STDOUT (16), STDERR (17)  the command's output, as it comes
    EXIT   (18)  u32 status (the exit code, or 128 + signal), u32 signal (0: it exited)
    ERROR  (19)  one line of text: the request failed (exec, open, chdir ...)
    DATA    (5)  READ's contents, an empty DATA at the end
    DONE   (20)  WRITE's file is written (and fsync'ed); IDENTITY is applied

An EXEC ends with EXIT or ERROR, a READ with its empty DATA or ERROR, a WRITE or an
IDENTITY with DONE or ERROR. An agent older than a request closes the stream unanswered. A payload is at most MAX_PAYLOAD bytes. If the host closes the stream while a
command runs, the agent kills the command's process group.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import PyvmmError

AGENT_PORT = 52
MAX_PAYLOAD = 1 << 20
CHUNK = 64 << 10

EXEC, STDIN, READ, WRITE, DATA, SIGNAL, IDENTITY = 1, 2, 3, 4, 5, 6, 7
STDOUT, STDERR, EXIT, ERROR, DONE = 16, 17, 18, 19, 20

MAX_ENTROPY = 512
MACHINE_ID_LENGTH = 32

_HEADER = struct.Struct("<IB")


class ProtocolError(PyvmmError):
    """The peer sent something the protocol does not allow (the client reports it as an AgentError)."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"agent frame of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    return _HEADER.pack(len(payload) + 1, kind) + payload


def _cstring(text: str | bytes, what: str) -> bytes:
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte: {text!r}")
    return raw + b"\0"


def exec_request(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> bytes:
    if not argv:
        raise ValueError("exec needs a command")
    env = env or {}
    for name in env:
        if not name or "=" in name:
            raise ValueError(f"bad environment variable name {name!r}")
    body = struct.pack("<II", len(argv), len(env))
    body += b"".join(_cstring(arg, "argument") for arg in argv)
    body += b"".join(_cstring(f"{name}={value}", "environment") for name, value in env.items())
    return frame(EXEC, body + _cstring(cwd or "", "cwd"))


def read_request(path: str) -> bytes:
    return frame(READ, _cstring(path, "path"))


def write_request(path: str, mode: int) -> bytes:
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"bad file mode {mode:o}")
    return frame(WRITE, struct.pack("<I", mode) + _cstring(path, "path"))


def identity_request(seconds: int, nanoseconds: int, machine_id: str, entropy: bytes) -> bytes:
    if not 0 <= seconds < 1 << 63 or not 0 <= nanoseconds < 1_000_000_000:
        raise ValueError(f"bad wall-clock time {seconds}.{nanoseconds:09d}")
    if len(machine_id) != MACHINE_ID_LENGTH or any(c not in "0123456789abcdef" for c in machine_id):
        raise ValueError(f"machine id {machine_id!r} is not {MACHINE_ID_LENGTH} lowercase hex digits")
    if len(entropy) > MAX_ENTROPY:
        raise ValueError(f"{len(entropy)} bytes of entropy (at most {MAX_ENTROPY})")
    return frame(IDENTITY, struct.pack("<QI", seconds, nanoseconds) + _cstring(machine_id, "machine id") + entropy)


def signal_request(signal: int) -> bytes:
    return frame(SIGNAL, struct.pack("<I", signal))


@dataclass(frozen=True)
class Exit:
    status: int   # the exit code, or 128 + the signal that killed the command
    signal: int   # 0 when the command exited by itself


def parse_exit(payload: bytes) -> Exit:
    if len(payload) != 8:
        raise ProtocolError(f"EXIT frame of {len(payload)} bytes, 8 expected")
    return Exit(*struct.unpack("<II", payload))


class FrameReader:
    """Frames out of a byte stream fed in pieces (any split)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            length, kind = _HEADER.unpack_from(self._buffer)
            if not 1 <= length <= MAX_PAYLOAD + 1:
                raise ProtocolError(f"agent frame length {length} out of range")
            if len(self._buffer) < 4 + length:
                break
            frames.append((kind, bytes(self._buffer[_HEADER.size:4 + length])))
            del self._buffer[:4 + length]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)
