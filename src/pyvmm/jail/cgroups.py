"""A jailed VM's control group: CPU, memory and PID limits.

cgroup v2 (one unified hierarchy with the cpu, memory and pids controllers) where the host has
it: the VM's group is PYVMM_GROUP/NAME under the hierarchy's root (v2's "no internal
processes" rule lets only groups without processes of their own hand controllers down). On a host that still binds those controllers to cgroup v1
(a hybrid layout, like our development machines') each controller's v1 hierarchy gets the
same limits, in a group under the jailer's own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import UserError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PYVMM_GROUP = "pyvmm-jail"
CPU_PERIOD_US = 100_000
CONTROLLERS = ("cpu", "memory", "pids")


class CgroupError(UserError):
    """The host's control groups cannot hold the jail's limits."""


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot set {path}: {exc.strerror}") from None


def _own_groups(proc_cgroup: str) -> dict[str, str]:
    """/proc/self/cgroup -> controller (or '' for v2) -> the path of this process's group."""
    groups = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            groups[controller] = path
    return groups


class Cgroup:
    """The group(s) of one jailed VM. create() makes them with the limits; add(pid) moves a
    process in (0: the caller); remove() deletes them once their processes have ended."""

    def __init__(self, name: str, *, cpus: float, memory_bytes: int, pids: int, root: Path = CGROUP_ROOT,
                 proc_cgroup: str | None = None) -> None:
        self.name = name
        self.limits = {"cpus": cpus, "memory": memory_bytes, "pids": pids}
        self.root = root
        self._proc_cgroup = proc_cgroup
        self.paths: list[Path] = []
        self.version = 2 if (root / "cgroup.controllers").exists() else 1

    def create(self) -> "Cgroup":
        if self.version == 2:
            self._create_v2()
        else:
            self._create_v1()
        return self

    def _create_v2(self) -> None:
        available = (self.root / "cgroup.controllers").read_text().split()
        missing = [c for c in CONTROLLERS if c not in available]
        if missing:
            raise CgroupError(f"cgroup v2 at {self.root} lacks the {', '.join(missing)} controller(s)")
        parent = self.root / PYVMM_GROUP
        parent.mkdir(exist_ok=True)
        for group in (self.root, parent):
            enabled = (group / "cgroup.subtree_control").read_text().split()
            wanted = " ".join(f"+{c}" for c in CONTROLLERS if c not in enabled)
            if wanted:
                _write(group / "cgroup.subtree_control", wanted)
        group = parent / self.name
        group.mkdir(exist_ok=True)
        self.paths = [group]
        quota = int(self.limits["cpus"] * CPU_PERIOD_US)
        _write(group / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        _write(group / "memory.max", str(self.limits["memory"]))
        _write(group / "pids.max", str(self.limits["pids"]))

    def _create_v1(self) -> None:
        own = _own_groups(self._proc_cgroup if self._proc_cgroup is not None else Path("/proc/self/cgroup").read_text())
        for controller in CONTROLLERS:
            hierarchy = self.root / controller
            if controller not in own or not hierarchy.is_dir():
                raise CgroupError(f"no cgroup hierarchy has the {controller} controller (cgroup v2 at {self.root} or "
                                  f"v1 at {hierarchy})")
            group = hierarchy / own[controller].lstrip("/") / PYVMM_GROUP / self.name
            group.mkdir(parents=True, exist_ok=True)
            self.paths.append(group)
        cpu, memory, pids = self.paths
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(int(self.limits["cpus"] * CPU_PERIOD_US)))
        _write(memory / "memory.limit_in_bytes", str(self.limits["memory"]))
        _write(pids / "pids.max", str(self.limits["pids"]))

    def add(self, pid: int) -> None:
        for group in self.paths:
            _write(group / "cgroup.procs", str(pid))

    def remove(self, wait: float = 10.0) -> None:
        """Delete the groups; a task that has just exited may hold one busy a moment (EBUSY)."""
        deadline = time.monotonic() + wait
        for group in self.paths:
            while True:
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        break  # left behind, empty: the next start of this VM reuses it
                    time.sleep(0.05)

    def describe(self) -> dict[str, object]:
        return {"version": self.version, "paths": [str(p) for p in self.paths], **self.limits}
