"""QEMU's side of the snapshot benchmarks (snapshot.py): a booted default guest driven over QMP.

QEMU runs the same default Debian guest as pyvmm (the image's bzImage-extracted PVH vmlinux
and initramfs, the same command line), on microvm, TCG, one vCPU, 256 MiB: boot.py's fastest
QEMU configuration. Its /init writes 0x01 to port 0x610 when it starts the command (an
isa-debugcon whose chardev is a pipe to this script), so "booted" means the same thing for
both VMMs. QEMU 7.2 (Debian 12) has no `file:` migration URI: a snapshot is `migrate` to
`exec:cat > PATH`, a restore `-incoming 'exec:cat PATH'`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

QEMU = "qemu-system-x86_64"
MEMORY_MIB = 256


class Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        self.file = self.sock.makefile("rwb")
        json.loads(self.file.readline())            # greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments):
        self.file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']['desc']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class QemuGuest:
    """One QEMU process with the default guest: booted (wait_booted) or waiting for a stream."""

    def __init__(self, image, vmlinux: str, command: list[str], extra_cmdline: str, *,
                 incoming: str | None = None, workdir: str | None = None, machine: str = "microvm",
                 extra_args: tuple[str, ...] = ()) -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pyvmm-bench-qemu-"))
        self.qmp_path = str(self.dir / f"qmp-{os.getpid()}-{id(self)}.sock")
        read_fd, write_fd = os.pipe()
        self.booted = threading.Event()
        argv = [QEMU, "-M", machine, "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults",
                "-no-reboot", "-display", "none", "-serial", "null",
                "-kernel", vmlinux, "-initrd", str(image.initramfs),
                "-append", image.command_line(command, extra=extra_cmdline),
                "-chardev", f"file,id=bootnotify,path=/dev/fd/{write_fd}",
                "-device", "isa-debugcon,iobase=0x610,chardev=bootnotify",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        argv += extra_args
        if incoming is not None:
            argv += ["-incoming", incoming]
        self.started = time.monotonic()
        self.process = subprocess.Popen(argv, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(write_fd)
        threading.Thread(target=self._read_notify, args=(read_fd,), daemon=True).start()
        self.qmp = Qmp(self.qmp_path)

    def _read_notify(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            if pipe.read(1):
                self.booted.set()

    def wait_booted(self, timeout: float = 120) -> float:
        if not self.booted.wait(timeout):
            raise RuntimeError(f"QEMU did not boot the guest in {timeout} s")
        return time.monotonic() - self.started

    def wait_running(self, timeout: float = 120) -> float:
        """Seconds from spawning the process until query-status says running."""
        deadline = self.started + timeout
        while self.qmp.command("query-status")["status"] != "running":
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("QEMU's incoming guest never ran")
            time.sleep(0.0005)
        return time.monotonic() - self.started

    def migrate(self, uri: str, timeout: float = 600, downtime_ms: int | None = None) -> dict:
        """`migrate` to `uri` and wait for completion: query-migrate's final answer."""
        if downtime_ms is not None:
            self.qmp.command("migrate-set-parameters", **{"downtime-limit": downtime_ms})
        self.qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        self.qmp.command("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.command("query-migrate")
            if info.get("status") == "completed":
                return info
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU migration {info.get('status')}: {info.get('error-desc', 'timed out')}")
            time.sleep(0.002)

    def pss_kib(self) -> int:
        return pss_kib(self.process.pid)

    def close(self) -> None:
        try:
            self.qmp.command("quit")
        except (OSError, RuntimeError, ValueError):
            pass
        try:
            self.qmp.close()
        except OSError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def pss_kib(pid: int) -> int:
    """Proportional set size of a process (/proc/PID/smaps_rollup): shared pages count once
    in total over the processes sharing them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def snapshot(image, vmlinux: str, command: list[str], extra: str, path: Path) -> tuple[float, int]:
    """Boot, wait for /init, migrate to a file: (seconds the migrate took, bytes written)."""
    guest = QemuGuest(image, vmlinux, command, extra)
    try:
        guest.wait_booted()
        time.sleep(0.5)     # the command is running
        guest.qmp.command("stop")
        started = time.monotonic()
        guest.migrate(f"exec:cat > {path}")
        return time.monotonic() - started, path.stat().st_size
    finally:
        guest.close()


def restore(image, vmlinux: str, command: list[str], extra: str, path: Path) -> float:
    """Process spawn -> running, from a file written by snapshot() (stopped at save: `cont`)."""
    guest = QemuGuest(image, vmlinux, command, extra, incoming=f"exec:cat {path}")
    try:
        deadline = time.monotonic() + 120
        while guest.qmp.command("query-status")["status"] not in ("paused", "running"):
            if time.monotonic() > deadline or guest.process.poll() is not None:
                raise RuntimeError("QEMU never loaded the snapshot")
            time.sleep(0.0005)
        guest.qmp.command("cont")
        return guest.wait_running()
    finally:
        guest.close()


def migrate(image, vmlinux: str, command: list[str], extra: str, settle: float = 1.0) -> dict:
    """Live-migrate a booted guest running `command` between two QEMU processes over a Unix
    socket: query-migrate's final figures (total-time and downtime in ms, ram stats)."""
    source = QemuGuest(image, vmlinux, command, extra)
    sock = str(source.dir / f"migrate-{os.getpid()}.sock")
    destination = QemuGuest(image, vmlinux, command, extra, incoming=f"unix:{sock}", workdir=str(source.dir))
    try:
        source.wait_booted()
        time.sleep(settle)
        return source.migrate(f"unix:{sock}", downtime_ms=300)    # QEMU's default limit
    finally:
        source.close()
        destination.close()


def booted_memory(image, vmlinux: str, command: list[str], extra: str, count: int) -> int:
    """Total PSS (KiB) of `count` QEMU processes, each with the guest booted and idle."""
    guests = [QemuGuest(image, vmlinux, command, extra) for _ in range(count)]
    try:
        for guest in guests:
            guest.wait_booted(300)
        time.sleep(1)
        return sum(g.pss_kib() for g in guests)
    finally:
        for guest in guests:
            guest.close()
