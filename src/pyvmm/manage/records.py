"""Where managed VMs live: definitions per user, and a runtime directory per running VM.

    $XDG_CONFIG_HOME/pyvmm/vms/NAME.toml (or .json)   the definition (manage/definitions.py)
    RUN/NAME/api.sock        the VM's API (mode 0600): its presence says the VM is up
             console.sock    attach a terminal (api/console.py)
             console.log     everything the guest printed (rotated to console.log.1 past 4 MiB)
             pid             "PID STARTTIME": the VM's process, and when it started (PIDs are reused)
             outcome.json    why the VM stopped, written by its process as it ends
             vmm.log         the process's stdout and stderr
             definition.json the configuration it was started with

RUN is $XDG_RUNTIME_DIR/pyvmm when XDG_RUNTIME_DIR is set, else /run/pyvmm for root and
/tmp/pyvmm-UID for others. A record whose process is gone without an outcome is a crash:
it stays, and `list` shows it, until the VM is started again or undefined.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class UnknownVm(UserError):
    """No definition and no record of a VM of that name."""


class VmExists(UserError):
    """A VM of that name is defined (or running) already."""


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise UserError(f"{name!r:.80} is not a VM name: 1-64 letters, digits, '_', '.', '-', not starting with "
                        "'.', '_' or '-'")
    return name


def _absolute_env(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value and os.path.isabs(value) else None  # XDG: relative values are ignored


def config_dir() -> Path:
    base = _absolute_env("XDG_CONFIG_HOME") or Path.home() / ".config"
    return base / "pyvmm" / "vms"


def run_root() -> Path:
    runtime = _absolute_env("XDG_RUNTIME_DIR")
    if runtime is not None:
        return runtime / "pyvmm"
    return Path("/run/pyvmm") if os.geteuid() == 0 else Path(f"/tmp/pyvmm-{os.getuid()}")


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (field 22 of /proc/PID/stat), or
    None if there is no such process or it is a zombie (it ended; nobody reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, name: str, root: Path | None = None) -> "RunDir":
        return cls((root or run_root()) / name)

    @property
    def name(self) -> str:
        return self.path.name

    api_sock = property(lambda self: self.path / "api.sock")
    console_sock = property(lambda self: self.path / "console.sock")
    console_log = property(lambda self: self.path / "console.log")
    pid_file = property(lambda self: self.path / "pid")
    outcome_file = property(lambda self: self.path / "outcome.json")
    vmm_log = property(lambda self: self.path / "vmm.log")
    definition_file = property(lambda self: self.path / "definition.json")

    def exists(self) -> bool:
        return self.pid_file.exists() or self.definition_file.exists()

    def pid(self) -> int | None:
        """The VM's process if it is alive (and is the one that wrote the pid file)."""
        try:
            pid_text, start_text = self.pid_file.read_text().split()
            pid, start = int(pid_text), int(start_text)
        except (OSError, ValueError):
            return None
        return pid if process_start_time(pid) == start else None

    def recorded_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def recorded_start(self) -> int | None:
        """The recorded process's start time (clock ticks after boot, /proc/PID/stat's field 22)."""
        try:
            return int(self.pid_file.read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def write_pid(self, pid: int | None = None) -> None:
        """Record `pid` (default: this process) as the VM's process (a jail's keeper records its child)."""
        pid = os.getpid() if pid is None else pid
        temporary = self.pid_file.with_suffix(".tmp")
        temporary.write_text(f"{pid} {process_start_time(pid)}\n")
        temporary.replace(self.pid_file)

    def outcome(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.outcome_file.read_text())
        except (OSError, ValueError):
            return None

    def write_outcome(self, outcome: dict[str, Any]) -> None:
        temporary = self.outcome_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(outcome) + "\n")
        temporary.replace(self.outcome_file)

    def last_log_line(self) -> str | None:
        try:
            with open(self.vmm_log, "rb") as log:
                log.seek(max(0, os.fstat(log.fileno()).st_size - 4096))
                lines = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return None
        return lines[-1] if lines else None

    def prepare(self) -> None:
        """A fresh directory for a new run: the previous run's record goes."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.chmod(0o700)
        self.clear()

    def clear(self) -> None:
        for entry in ("api.sock", "console.sock", "pid", "outcome.json", "definition.json", "restore.json", "jail.json",
                      "vmm.log", "console.log", "console.log.1"):
            try:
                (self.path / entry).unlink()
            except FileNotFoundError:
                pass

    def remove(self) -> None:
        if self.path.exists():
            self.clear()
            try:
                self.path.rmdir()
            except OSError:
                pass
