"""The Python client: `pyvmm.connect()` and a handle per VM, for everything the CLI does.

    import pyvmm
    host = pyvmm.connect()
    vm = host.define({"machine-config": {"vcpu_count": 1, "mem_size_mib": 256}}, name="demo")
    vm.start()
    vm.state()                 # 'running'
    vm.suspend(); vm.resume()
    print(vm.console_history().decode())
    vm.destroy()
    vm.undefine()

There is no daemon: the client reads definitions and run records from disk and talks to each
running VM over its API socket (ApiClient speaks HTTP/1.1 on a Unix socket). Errors are
UserError subclasses with one-line messages: UnknownVm, VmExists, DefinitionError,
ApiError (the VM refused a request: .status and .fault_message), StartError.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlencode

from ..errors import UserError
from . import definitions
from .launch import launch, wait_exit
from .balloon_client import BalloonMethods
from .hotplug_client import HotplugMethods
from .memory_client import MemoryMethods
from .records import RunDir, UnknownVm, VmExists, check_name, config_dir, run_root

if TYPE_CHECKING:
    from ..agent.client import ExecResult

RUNNING, PAUSED, STARTING, SHUT_OFF, CRASHED, UNRESPONSIVE = \
    "running", "paused", "starting", "shut off", "crashed", "unresponsive"
INCOMING = "incoming"           # started with --incoming: waits for a live migration
MIGRATED = "migrated"           # its VM went to another pyvmm (live migration); nothing runs here
ACTIVE = (RUNNING, PAUSED, STARTING, UNRESPONSIVE, INCOMING)
_ERROR_REASONS = ("panic", "triple-fault", "guest-error", "vmm-error", "failed", "process-died")
_API_STATES = {"Running": RUNNING, "Paused": PAUSED, "Not started": STARTING, "Stopped": SHUT_OFF,
               "Incoming": INCOMING}


class ApiError(UserError):
    """The VM's API answered with an error."""

    def __init__(self, status: int, fault_message: str) -> None:
        super().__init__(fault_message)
        self.status, self.fault_message = status, fault_message


class MigrationFailed(UserError):
    """A live migration that did not happen (the VM runs on where it was)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)  # blocking: a full backlog waits instead of failing with EAGAIN
        self.sock.settimeout(self.timeout)


class ApiClient:
    """HTTP/1.1 requests to one VM's API socket; JSON in and out."""

    def __init__(self, socket_path: str | os.PathLike, timeout: float = 60.0) -> None:
        self.socket_path, self.timeout = str(socket_path), timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The answer's JSON (or bytes for octet-stream, None for 204); ApiError for 4xx/5xx."""
        connection = _UnixConnection(self.socket_path, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        if response.status >= 400:
            try:
                message = json.loads(payload)["fault_message"]
            except (ValueError, KeyError, TypeError):
                message = payload.decode(errors="replace") or response.reason
            raise ApiError(response.status, message)
        if response.status == 204 or not payload:
            return None
        if response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(payload)
        return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)


@dataclass(frozen=True)
class VmInfo:
    name: str
    state: str                       # running, paused, starting, unresponsive, shut off, crashed
    pid: int | None
    defined: bool
    vcpus: int | None
    memory_mib: int | None
    outcome: dict[str, Any] | None   # why it last stopped: reason, status, message
    run_dir: Path
    definition: Path | None
    uptime_s: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class VmHandle(MemoryMethods, BalloonMethods, HotplugMethods):
    """One VM by name: defined, running, or both."""

    def __init__(self, host: "Host", name: str) -> None:
        self.host, self.name = host, check_name(name)
        self.run = RunDir.of(name, host.run_root)

    def __repr__(self) -> str:
        return f"VmHandle({self.name!r})"

    @property
    def api(self) -> ApiClient:
        return ApiClient(self.run.api_sock)

    def _live_api(self) -> ApiClient:
        if self.run.pid() is None:
            raise UserError(f"{self.name} is not running")
        return self.api

    # --- state ------------------------------------------------------------------------------

    def info(self) -> VmInfo:
        path = definitions.find(self.name, self.host.config_dir)
        pid = self.run.pid()
        if path is None and pid is None and not self.run.exists():
            raise UnknownVm(f"no VM named {self.name!r}")
        machine = self._machine(path)
        outcome, uptime = None, None
        if pid is not None:
            state = STARTING
            if self.run.api_sock.exists():
                try:
                    api = ApiClient(self.run.api_sock, timeout=10)
                    status = api.get("/pyvmm/status")
                    state, outcome = _API_STATES.get(status["state"], status["state"]), status["outcome"]
                    if status.get("started_at"):
                        uptime = time.time() - status["started_at"]
                except (OSError, ApiError, http.client.HTTPException):
                    state = UNRESPONSIVE
                if state in (RUNNING, PAUSED):   # setvcpus may have changed it since the start
                    try:
                        machine["vcpu_count"] = api.get("/pyvmm/vcpus")["count"]
                    except (OSError, ApiError, http.client.HTTPException):
                        pass    # stopped meanwhile: the count it was started with
        elif self.run.pid_file.exists():
            outcome = self.run.outcome()
            if outcome is None:
                outcome = self._death()
            state = CRASHED if outcome["reason"] in _ERROR_REASONS else \
                MIGRATED if outcome["reason"] == "migrated" else SHUT_OFF
        else:
            state = SHUT_OFF
        return VmInfo(self.name, state, pid, path is not None, machine.get("vcpu_count"), machine.get("mem_size_mib"),
                      outcome, self.run.path, path, uptime)

    def _death(self) -> dict[str, Any]:
        """The outcome of a VM whose process died without recording one."""
        from .deaths import seccomp_kill
        from .vmprocess import SECCOMP_KILLED

        pid, started = self.run.recorded_pid(), self.run.recorded_start()
        killed = seccomp_kill(pid, started) if pid is not None else None
        if killed is not None:
            return {"reason": "process-died", "status": None, "killed_by": "seccomp", "signal": "SIGSYS",
                    "message": f"the VM's process (pid {pid}) {SECCOMP_KILLED}: {killed}"}
        last = self.run.last_log_line()
        return {"reason": "process-died", "status": None,
                "message": f"the VM's process (pid {pid}) died without recording an outcome"
                           + (f"; its last log line: {last}" if last else "")}

    def _machine(self, path: Path | None) -> dict[str, Any]:
        try:
            document = json.loads(self.run.definition_file.read_text())
        except (OSError, ValueError):
            document = None
        if document is None and path is not None:
            try:
                document = definitions.load_file(path, self.name).document
            except UserError:
                document = None
        machine = (document or {}).get("machine-config") or {}
        return {"vcpu_count": machine.get("vcpu_count", 1), "mem_size_mib": machine.get("mem_size_mib", 128)}

    def state(self) -> str:
        return self.info().state

    def stats(self) -> dict[str, Any]:
        return self._live_api().get("/pyvmm/stats")

    def devices(self) -> list[dict[str, Any]]:
        return self._live_api().get("/pyvmm/devices")

    def config(self) -> dict[str, Any]:
        return self._live_api().get("/vm/config")

    def set_rate_limit(self, device_id: str, **limits: dict[str, Any] | None) -> None:
        """Change a running VM's drive (rate_limiter=) or interface (rx_rate_limiter=, tx_rate_limiter=)
        limits, in Firecracker's RateLimiter form; a bucket not named keeps its setting (api/rate_limits.py)."""
        kind, key = ("drives", "drive_id") if "rate_limiter" in limits else ("network-interfaces", "iface_id")
        self._live_api().patch(f"/{kind}/{device_id}", {key: device_id, **limits})

    # --- the guest agent, through the VM's API (the VM needs a vsock device) ------------------

    def exec(self, argv: list[str], stdin: bytes = b"", *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: int | None = None) -> "ExecResult":
        """Run `argv` in the guest: its stdout, stderr and exit status (a failing command is
        not an error; a guest without an agent is, ApiError 400)."""
        from ..agent.client import ExecResult

        body: dict[str, Any] = {"argv": list(argv), "stdin": base64.b64encode(stdin).decode()}
        for key, value in (("env", env), ("cwd", cwd), ("timeout", timeout)):
            if value is not None:
                body[key] = value
        answer = self._live_api().put("/pyvmm/agent/exec", body)
        return ExecResult(base64.b64decode(answer["stdout"]), base64.b64decode(answer["stderr"]),
                          answer["exit_status"], answer["signal"])

    def read_file(self, path: str) -> bytes:
        """A guest file's contents."""
        return self._live_api().get("/pyvmm/agent/files?" + urlencode({"path": path})) or b""

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace a guest file."""
        self._live_api().put("/pyvmm/agent/files", {"path": path, "content": base64.b64encode(data).decode(),
                                                    "mode": mode})

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, incoming: str | None = None, jail: bool = False) -> int:
        """Boot the defined VM in the background; returns once it runs (its pid). With
        `incoming` (unix:PATH or tcp:HOST:PORT) it does not boot but waits there for a live
        migration of a VM like its definition; returns once it listens. `jail`: in a jail
        (manage/jailer.py), with the definition's [pyvmm] jail settings or the defaults."""
        document = definitions.load(self.name, self.host.config_dir).spec.to_document()
        if jail:
            document.setdefault("pyvmm", {}).setdefault("jail", {})
        return launch(self.run, document, instance_id=self.name, incoming=incoming)

    def suspend(self) -> None:
        self._live_api().patch("/vm", {"state": "Paused"})

    def resume(self) -> None:
        self._live_api().patch("/vm", {"state": "Resumed"})

    def reboot(self) -> None:
        self._live_api().put("/pyvmm/actions", {"action_type": "Reboot"})

    def destroy(self, timeout: float = 30.0) -> None:
        """Stop the VM at once. If its API does not answer, its process is killed."""
        pid = self.run.pid()
        if pid is None:
            raise UserError(f"{self.name} is not running")
        try:
            self.api.put("/pyvmm/actions", {"action_type": "Stop"})
        except ApiError:
            raise
        except (OSError, http.client.HTTPException):
            os.kill(pid, signal.SIGKILL)
            wait_exit(pid, timeout)
            self.run.write_outcome({"reason": "destroyed", "status": 0, "boots": None, "ended_at": time.time(),
                                    "message": "killed by destroy: the VM's API did not answer"})
            return
        if not wait_exit(pid, timeout):
            raise UserError(f"{self.name}: the VM stopped but its process (pid {pid}) did not end within {timeout:.0f} s")

    def shutdown(self, timeout: float = 60.0) -> None:
        """Press the ACPI power button and wait for the guest to power off."""
        pid = self.run.pid()
        if pid is None:
            raise UserError(f"{self.name} is not running")
        self.api.put("/pyvmm/actions", {"action_type": "Shutdown"})
        if not wait_exit(pid, timeout):
            raise UserError(f"{self.name} did not power off within {timeout:g} s of the power button "
                            "(the guest may ignore it): use destroy to stop it at once")

    # --- snapshots --------------------------------------------------------------------------

    def snapshot(self, path: str | os.PathLike, *, mem_file: str | os.PathLike | None = None,
                 diff: bool = False) -> None:
        """Snapshot the VM to `path` (its state) and `mem_file` (its RAM; default PATH.mem). A
        running VM is paused for it and resumed after; a paused one stays paused. `diff`: only
        the pages written since the previous snapshot (needs track_dirty_pages)."""
        api = self._live_api()
        running = api.get("/")["state"] == "Running"
        if running:
            api.patch("/vm", {"state": "Paused"})
        try:
            api.put("/snapshot/create", {**_snapshot_files(path, mem_file),
                                         "snapshot_type": "Diff" if diff else "Full"})
        finally:
            if running:
                api.patch("/vm", {"state": "Resumed"})

    def save(self, path: str | os.PathLike, *, mem_file: str | os.PathLike | None = None,
             timeout: float = 30.0) -> None:
        """virsh save: snapshot the VM to `path` (and `mem_file`, default PATH.mem), then stop it.
        If the snapshot fails the VM goes on as it was."""
        api = self._live_api()
        running = api.get("/")["state"] == "Running"
        if running:
            api.patch("/vm", {"state": "Paused"})
        try:
            api.put("/snapshot/create", {**_snapshot_files(path, mem_file), "snapshot_type": "Full"})
        except BaseException:
            if running:
                api.patch("/vm", {"state": "Resumed"})
            raise
        self.destroy(timeout)

    # --- live migration ---------------------------------------------------------------------

    def migrate(self, destination: str, *, downtime_ms: int | None = None, bandwidth: int | None = None,
                timeout: int | None = None, max_rounds: int | None = None, wait: bool = True,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Migrate this running VM to a VM started with `incoming=destination` (here or on
        another host). With `wait`, returns the final figures once the destination runs it
        (this VM has then stopped, outcome "migrated") and raises MigrationFailed if it did
        not happen (this VM runs on); `on_progress(progress)` sees each poll."""
        body: dict[str, Any] = {"destination": destination}
        for key, value in (("downtime_ms", downtime_ms), ("bandwidth", bandwidth), ("timeout", timeout),
                           ("max_rounds", max_rounds)):
            if value is not None:
                body[key] = value
        self._live_api().put("/pyvmm/migration", body)
        return self.wait_migration(on_progress) if wait else self.migration_progress()

    def migration_progress(self) -> dict[str, Any]:
        """The last migration's progress (the final figures once this VM has migrated away)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return self._live_api().get("/pyvmm/migration")
            except (OSError, http.client.HTTPException, UserError) as exc:
                if isinstance(exc, ApiError):
                    raise
                record = self.run.outcome() if self.run.pid() is None else None
                if record is not None and "migration" in record:
                    return record["migration"]
                if self.run.pid() is None or time.monotonic() > deadline:
                    raise UserError(f"{self.name}: no migration to report (the VM is not running)") from None
                time.sleep(0.05)  # the VM's process is ending: its record comes next

    def wait_migration(self, on_progress: Callable[[dict[str, Any]], None] | None = None,
                       poll: float = 0.25) -> dict[str, Any]:
        while True:
            progress = self.migration_progress()
            if on_progress is not None:
                on_progress(progress)
            if progress["status"] == "completed":
                return progress
            if progress["status"] in ("failed", "cancelled"):
                raise MigrationFailed(f"{self.name}: {progress['error']}")
            time.sleep(poll)

    def cancel_migration(self) -> None:
        """Stop the migration under way: this VM runs on."""
        self._live_api().request("PUT", "/pyvmm/migration/cancel")

    # --- console ----------------------------------------------------------------------------

    def console_history(self, tail: int | None = None) -> bytes:
        """What the guest printed: from the running VM, else from its record's log file."""
        if self.run.pid() is not None:
            return self.api.get("/pyvmm/console" + (f"?tail={tail}" if tail is not None else "")) or b""
        try:
            data = self.run.console_log.read_bytes()
        except FileNotFoundError:
            return b""
        return data[-tail:] if tail else data if tail is None else b""

    def open_console(self, replay: int = 16 << 10) -> socket.socket:
        """A socket attached to the serial console: the last `replay` bytes printed, then the
        live output; what is sent to it is typed into the guest. Close it to detach."""
        return self._attach(replay)[0]

    def attach_console(self, replay: int = 16 << 10) -> tuple[socket.socket, bytes]:
        """Like open_console, with the replayed history apart: (socket of live output, history)."""
        conn, length = self._attach(replay)
        history = b""
        while len(history) < length:
            chunk = conn.recv(length - len(history))
            if not chunk:
                break
            history += chunk
        return conn, history

    def _attach(self, replay: int) -> tuple[socket.socket, int]:
        self._live_api()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(self.run.console_sock))
            conn.sendall(f"attach {int(replay)}\n".encode())
            header = b""
            while not header.endswith(b"\n") and len(header) < 32:
                chunk = conn.recv(1)
                if not chunk:
                    break
                header += chunk
        except OSError as exc:
            conn.close()
            raise UserError(f"{self.name}: cannot attach to the console: {exc.strerror or exc}") from None
        words = header.split()
        if len(words) != 2 or words[0] != b"ok" or not words[1].isdigit():
            conn.close()
            raise UserError(f"{self.name}: the console refused to attach: {header.decode(errors='replace').strip()}")
        return conn, int(words[1])

    # --- definition -------------------------------------------------------------------------

    def undefine(self) -> None:
        if self.run.pid() is not None:
            raise UserError(f"{self.name} is running: destroy or shut it down first")
        definitions.remove(self.name, self.host.config_dir)
        self.run.remove()

    def clone(self, new_name: str) -> "VmHandle":
        from .clone import clone

        return clone(self.host, self.name, new_name)


class Host:
    """The VMs of this user on this machine (definitions and run records; no daemon)."""

    def __init__(self, config_dir: str | os.PathLike | None = None, run_root: str | os.PathLike | None = None) -> None:
        self.config_dir = Path(config_dir) if config_dir is not None else config_dir_default()
        self.run_root = Path(run_root) if run_root is not None else run_root_default()

    def vm(self, name: str) -> VmHandle:
        """The VM called `name` (UnknownVm if it is neither defined nor recorded)."""
        handle = VmHandle(self, name)
        if definitions.find(name, self.config_dir) is None and not handle.run.exists():
            raise UnknownVm(f"no VM named {name!r}")
        return handle

    def define(self, document: dict[str, Any] | str | os.PathLike, name: str | None = None, *,
               replace: bool = False) -> VmHandle:
        """Define a VM from a document (dict) or a definition file (TOML or JSON; its text is
        kept as written). The name: `name`, else the document's "name", else the file's stem."""
        if isinstance(document, dict):
            definition = definitions.from_document(document, "definition", name)
            definitions.store(definition, directory=self.config_dir, replace=replace)
        else:
            path = Path(document)
            if path.suffix not in definitions.SUFFIXES:
                raise definitions.DefinitionError(f"{path}: a definition is a .toml or .json file")
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise definitions.DefinitionError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
            parsed = definitions.parse(text, path.suffix, str(path))
            named = isinstance(parsed, dict) and "name" in parsed
            definition = definitions.from_document(parsed, str(path), name or (None if named else path.stem), path)
            definitions.store(definition, text=text, suffix=path.suffix, directory=self.config_dir, replace=replace)
        return VmHandle(self, definition.name)

    def create(self, document: dict[str, Any], name: str) -> VmHandle:
        """Define and start in one step; the definition is removed again if the start fails."""
        handle = self.define(document, name)
        try:
            handle.start()
        except BaseException:
            definitions.remove(name, self.config_dir)
            raise
        return handle

    def restore(self, path: str | os.PathLike, *, name: str | None = None, mem_file: str | os.PathLike | None = None,
                mode: str = "copy") -> VmHandle:
        """virsh restore: start a managed VM from the snapshot at `path` (and `mem_file`, default
        PATH.mem), running, in the background. Its name: `name`, else the name saved with the
        snapshot, else the file's stem. `mode`: copy, cow or uffd (pyvmm.snapshot)."""
        from ..snapshot import read_snapshot

        files = _snapshot_files(path, mem_file)
        _, document = read_snapshot(files["snapshot_path"])        # a bad file: one line, nothing started
        document = dict(document or {})
        handle = VmHandle(self, name or document.pop("name", None) or Path(path).stem.split(".")[0])
        document.pop("name", None)
        launch(handle.run, document, instance_id=handle.name,
               restore={"snapshot_path": files["snapshot_path"], "resume_vm": True, "restore_mode": mode,
                        "mem_backend": {"backend_type": "File", "backend_path": files["mem_file_path"]}})
        return handle

    def clone_from_snapshot(self, path: str | os.PathLike, new_name: str, *, mem_file: str | os.PathLike | None = None,
                            mode: str = "cow") -> VmHandle:
        """Start NEW_NAME as a clone of the snapshot at `path` (and `mem_file`, default PATH.mem),
        running in the background, and define it (clone.clone_from_snapshot)."""
        from .clone import clone_from_snapshot

        return clone_from_snapshot(self, _snapshot_files(path, mem_file), new_name, mode=mode)

    def names(self) -> list[str]:
        recorded = {p.name for p in self.run_root.iterdir() if p.is_dir()} if self.run_root.is_dir() else set()
        return sorted(set(definitions.names(self.config_dir)) | recorded)

    def list(self, all: bool = False) -> list[VmInfo]:
        """Running VMs and crashed ones (a crash is never silently forgotten); all=True adds
        the shut-off ones."""
        infos = []
        for name in self.names():
            try:
                info = VmHandle(self, name).info()
            except (UnknownVm, UserError):
                continue
            if all or info.active or info.state == CRASHED:
                infos.append(info)
        return infos


def _snapshot_files(path: str | os.PathLike, mem_file: str | os.PathLike | None) -> dict[str, str]:
    """The state and memory file paths, absolute (the VM's process has its own working directory)."""
    state = os.path.abspath(path)
    return {"snapshot_path": state, "mem_file_path": os.path.abspath(mem_file) if mem_file else f"{state}.mem"}


def config_dir_default() -> Path:
    return config_dir()


def run_root_default() -> Path:
    return run_root()


def connect(config_dir: str | os.PathLike | None = None, run_root: str | os.PathLike | None = None) -> Host:
    """The VMs of this user: definitions from `config_dir` (default $XDG_CONFIG_HOME/pyvmm/vms),
    run records from `run_root` (default $XDG_RUNTIME_DIR/pyvmm, /run/pyvmm for root)."""
    return Host(config_dir, run_root)


__all__ = ["ApiClient", "ApiError", "Host", "MigrationFailed", "UnknownVm", "VmExists", "VmHandle", "VmInfo", "connect"]
