"""The host's memory machinery for tests (root): a memory-limited cgroup and KSM turned on.

MemoryCgroup sits below this process's own cgroup (so nothing escapes the limits the test
already runs under), on cgroup v2 (memory.max) or, where the memory controller is still on a
v1 hierarchy, v1 (memory.limit_in_bytes); removed on close. ksm_running() starts KSM and puts
its settings back after."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _own(hierarchy: str) -> str | None:
    """This process's cgroup path in the hierarchy `hierarchy` ('' for v2, 'memory' for v1)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == hierarchy or (hierarchy and hierarchy in controllers.split(",")):
            return path
    return None


def available() -> str | None:
    """Why no memory cgroup can be made here, or None."""
    if os.geteuid() != 0:
        return "making a cgroup needs root"
    if (V2_ROOT / "cgroup.controllers").exists() and "memory" in (V2_ROOT / "cgroup.controllers").read_text():
        return None
    if (V1_MEMORY / "memory.limit_in_bytes").exists() and _own("memory") is not None:
        return None
    return "no cgroup memory controller (v2 memory.max or v1 memory.limit_in_bytes)"


class MemoryCgroup:
    def __init__(self, name: str, limit: int) -> None:
        if (V2_ROOT / "cgroup.controllers").exists() and "memory" in (V2_ROOT / "cgroup.controllers").read_text():
            self.v2 = True
            parent = V2_ROOT / (_own("") or "/").lstrip("/")
            (parent / "cgroup.subtree_control").write_text("+memory")
        else:
            self.v2 = False
            parent = V1_MEMORY / (_own("memory") or "/").lstrip("/")
        self.path = parent / f"{name}-{os.getpid()}"
        self.path.mkdir()
        self.limit = limit
        if self.v2:
            self._write("memory.max", str(limit))
            self._write("memory.swap.max", "0")
        else:
            self._write("memory.limit_in_bytes", str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                self._write("memory.memsw.limit_in_bytes", str(limit))

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def join(self) -> None:
        """Put the calling process in the cgroup (a subprocess's preexec_fn: its children follow)."""
        self._write("cgroup.procs", str(os.getpid()))

    def usage(self) -> int:
        return int(self._read("memory.current" if self.v2 else "memory.usage_in_bytes"))

    def peak(self) -> int | None:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int(self._read(name)) if (self.path / name).exists() else None

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.v2 else "memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def processes(self) -> list[int]:
        return [int(pid) for pid in self._read("cgroup.procs").split()]

    def close(self) -> None:
        """Remove the cgroup once its processes are gone (the caller ends them)."""
        deadline = time.monotonic() + 30
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.path.rmdir()


KSM_DIR = Path("/sys/kernel/mm/ksm")


@contextlib.contextmanager
def ksm_running(sleep_ms: int = 10):
    """KSM on (run=1, scanning every `sleep_ms`) for the block; run and sleep_millisecs put back.
    The caller checks for root and KSM_DIR first."""
    run, sleep = (KSM_DIR / "run").read_text().strip(), (KSM_DIR / "sleep_millisecs").read_text().strip()
    try:
        (KSM_DIR / "sleep_millisecs").write_text(str(sleep_ms))
        (KSM_DIR / "run").write_text("1")
        yield
    finally:
        (KSM_DIR / "run").write_text(run)
        (KSM_DIR / "sleep_millisecs").write_text(sleep)
