"""pyvmm.Sandbox: a fresh, disposable Linux machine for running commands, in a few lines.

    import pyvmm

    with pyvmm.Sandbox() as sb:                      # restored from the warm snapshot
        result = sb.run("uname -r; echo hi >&2")
        print(result.stdout, result.stderr, result.exit_status)
        sb.files.write("/tmp/data.txt", b"hello")
        assert sb.files.read("/tmp/data.txt") == b"hello"
        try:
            sb.run("sleep 100", timeout=2)           # the command is killed in the guest
        except pyvmm.SandboxTimeout:
            pass
    # the VM is gone: no process, thread, socket or file of it is left

Each sandbox is the default Debian guest (256 MiB, one vCPU, the agent on vsock) running in
this process. By default it is restored from the warm snapshot (made on first use, like the
image; see warm.py) and given its own identity: no two sandboxes share random numbers, a
machine id or a vsock CID, and the guest's clock is the host's. `Sandbox(warm=False)` boots
the guest instead (seconds on the software CPU).
"""

from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    from .guest import RunningGuest


class SandboxError(UserError):
    """The sandbox could not do what was asked (one line): it has been closed, the guest's
    agent failed, a file could not be read or written..."""


class SandboxTimeout(SandboxError):
    """A command ran past its timeout; it was killed in the guest (the sandbox goes on)."""


@dataclass(frozen=True)
class RunResult:
    """A finished command: its output and how it ended."""
    stdout: bytes
    stderr: bytes
    exit_status: int      # the exit code, or 128 + the signal that killed the command
    signal: int = 0       # that signal, 0 when the command exited by itself

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")


class SandboxFiles:
    """The guest's files, through its agent: `sb.files.write(path, data)`, `sb.files.read(path)`."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sandbox = sandbox

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Create or replace `path` in the guest with `data` (str is written as UTF-8)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        self._sandbox._agent_call(lambda client: client.write_file(path, raw, mode))

    def read(self, path: str) -> bytes:
        """The contents of `path` in the guest."""
        return self._sandbox._agent_call(lambda client: client.read_file(path))


class Sandbox:
    """A disposable guest. Use it as a context manager (or call close()): leaving the block
    stops the VM and releases everything it held.

    `warm`: start from the warm snapshot (default) or boot. `accel`: "auto", "kvm" or "tcg".
    `timeout`: the default timeout of run(), in seconds (None: none). `console`: a callable
    given the guest's serial console output (default: discarded)."""

    def __init__(self, *, warm: bool = True, accel: str = "auto", timeout: float | None = None,
                 console: Callable[[bytes], None] | None = None) -> None:
        self.warm = warm
        self.accel = accel
        self.timeout = timeout
        self.files = SandboxFiles(self)
        self._console = console
        self._guest: RunningGuest | None = None
        self._lock = threading.Lock()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Sandbox":
        """Start the guest (the context manager does); returns self."""
        from .guest import start_guest

        with self._lock:
            if self._closed:
                raise SandboxError("this sandbox has been closed: make a new one")
            if self._guest is None:
                self._guest = start_guest(warm=self.warm, accel=self.accel, console_write=self._console)
        return self

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the guest at once and release everything (idempotent)."""
        with self._lock:
            self._closed = True
            guest, self._guest = self._guest, None
        if guest is not None:
            guest.close()

    def kill(self) -> None:
        """Stop the guest at once, whatever runs in it; the sandbox is closed (as close())."""
        self.close()

    @property
    def started_from(self) -> str | None:
        """"snapshot" or "boot" once started; None before."""
        guest = self._guest
        return None if guest is None else guest.started_from

    @property
    def running(self) -> bool:
        guest = self._guest
        return guest is not None and not guest.vm.stopped

    # --- commands ----------------------------------------------------------------------------

    def run(self, command: str | Sequence[str], *, stdin: bytes | str = b"", timeout: float | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None) -> RunResult:
        """Run `command` in the guest and wait for it: a string goes to `sh -c`, a sequence is
        the argv. `timeout` (default: the sandbox's): seconds before the command is killed and
        SandboxTimeout raised. A command that cannot be started (no such program, a bad cwd)
        is a SandboxError; a command that fails is a RunResult with its exit status."""
        argv = ["sh", "-c", command] if isinstance(command, str) else [str(word) for word in command]
        if not argv:
            raise SandboxError("run: no command")
        data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        limit = self.timeout if timeout is None else timeout
        result = self._agent_call(lambda client: client.exec(argv, data, env=dict(env or {}), cwd=cwd, timeout=limit),
                                  what=shlex.join(argv))
        return RunResult(result.stdout, result.stderr, result.status, result.signal)

    def _agent_call(self, call, what: str = ""):
        from ..agent import AgentError
        from ..agent.client import AgentTimeout

        guest = self._guest
        if guest is None:
            raise SandboxError("this sandbox has been closed" if self._closed else
                               "this sandbox is not started: use it in a with block or call start()")
        try:
            return call(guest.client)
        except AgentTimeout as exc:
            raise SandboxTimeout(f"{what}: {exc}" if what else str(exc)) from None
        except AgentError as exc:
            if guest.vm is None or guest.vm.stopped:
                raise SandboxError("the sandbox's guest has stopped" + (f": {guest.vm.outcome.message}"
                                                                          if guest.vm is not None else "")) from None
            raise SandboxError(str(exc)) from None
