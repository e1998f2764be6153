#!/usr/bin/env python3
"""Snapshots, restore, migration and clones: pyvmm next to QEMU, same guest, same run.

Both VMMs run pyvmm's default Debian guest (`pyvmm image build`) with 256 MiB and one vCPU
on a software CPU (pyvmm: Unicorn; QEMU: TCG, microvm, the same PVH vmlinux, initramfs and
command line; see qemu_side.py and pyvmm_side.py). "Booted" is the guest's /init writing
"init started" to port 0x610 for both. Rows:

  snapshot      a booted guest idling in `sleep`, paused: time to write the snapshot and
                the files' size (pyvmm: save_snapshot, the memory file sparse; QEMU:
                `migrate` to `exec:cat > FILE`, its stream format)
  restore       to a running guest: pyvmm in this process (load_snapshot + resume, copy,
                cow and uffd modes) and from spawning a pyvmm process; QEMU from spawning
                `-incoming 'exec:cat FILE'` until query-status says running
  run           `pyvmm run -- true`, process start to exit, from the warm snapshot (the
                default; made once before the timed runs) and from a cold boot (--cold);
                QEMU's cold boot to exit (microvm, PVH)
  migration     live migration over a Unix socket between two processes, an idle guest
                and one rewriting 100 MiB in a loop: total time and downtime (QEMU:
                query-migrate's; pyvmm: MigrationProgress, with where its downtime went),
                downtime limit 300 ms for both
  memory        total PSS (/proc/PID/smaps_rollup) of --clones pyvmm clones of one
                snapshot (cow: one memory file in the page cache), each a process of its
                own and all forked from one zygote process that imported pyvmm first (its
                interpreter shared copy-on-write), next to as many booted pyvmm VMs and
                booted QEMU VMs

Goals (issue 14): restore to running within 30 ms for a 256 MiB guest; run -- true from
the snapshot under 0.5 s; migration downtime under 50 ms idle and below QEMU's dirtying;
ten clones in less memory than three booted VMs. A row whose pyvmm feature is not in this
checkout says so instead of a figure.

    .venv/bin/python benchmarks/snapshot.py [--skip-qemu] [--rows snapshot,restore,...] [--clones 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import pyvmm_side  # noqa: E402
import qemu_side  # noqa: E402

ROWS = ("snapshot", "restore", "run", "migration", "memory")
IDLE = ["sleep", "100000"]
DIRTYING = ["sh", "-c", "while true; do dd if=/dev/zero of=/tmp/dirty bs=1M count=100 2>/dev/null; done"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def mib(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


def missing(feature: str, exc: Exception) -> str:
    return f"n/a ({feature} not in this checkout: {exc})"


class Bench:
    def __init__(self, args) -> None:
        from pyvmm.accel.tcg.host_tsc import host_tsc_hz
        from pyvmm.accel.tcg.accelerator import TcgAccelerator
        from pyvmm.images import default_image
        from pyvmm.loader.linux import extract_vmlinux

        self.args = args
        self.image = default_image()
        self.vmlinux = str(extract_vmlinux(self.image.kernel))
        # QEMU's microvm gets the TSC rate as boot.py gives it, and pyvmm's software-CPU argument
        self.qemu_extra = f"{TcgAccelerator.linux_cmdline} tsc_early_khz={host_tsc_hz() // 1000}"
        self.dir = Path(tempfile.mkdtemp(prefix="pyvmm-bench-snapshot-"))
        self.state, self.mem = self.dir / "vm.state", self.dir / "vm.mem"
        self.qemu_file = self.dir / "qemu.migration"

    def row(self, name: str, pyvmm: str, qemu: str) -> None:
        print(f"{name:<34} pyvmm: {pyvmm}")
        if not self.args.skip_qemu:
            print(f"{'':<34} QEMU:  {qemu}")
        sys.stdout.flush()

    def qemu(self, what, *args) -> str:
        if self.args.skip_qemu:
            return ""
        return what(self.image, self.vmlinux, *args)

    # --- rows -----------------------------------------------------------------------------

    def snapshot(self) -> None:
        try:
            seconds, size, data = pyvmm_side.snapshot(IDLE, self.state, self.mem)
            ours = f"{ms(seconds)}, files {mib(size)} ({mib(data)} data, the rest holes)"
        except ImportError as exc:
            ours = missing("pyvmm.snapshot", exc)
        theirs = ""
        if not self.args.skip_qemu:
            seconds, size = qemu_side.snapshot(self.image, self.vmlinux, IDLE, self.qemu_extra, self.qemu_file)
            theirs = f"{ms(seconds)}, file {mib(size)}"
        self.row("snapshot (idle guest)", ours, theirs)

    def restore(self) -> None:
        if not self.state.exists():
            ours = "n/a (no pyvmm snapshot: see the snapshot row)"
        else:
            parts = []
            for mode in ("copy", "cow", "uffd"):
                try:
                    inside = min(pyvmm_side.restore_in_process(self.state, self.mem, mode) for _ in range(3))
                    total, loaded = min(pyvmm_side.restore_process(self.state, self.mem, mode) for _ in range(3))
                    parts.append(f"{mode}: {ms(inside)} in process, {ms(total)} from process start "
                                 f"({ms(loaded)} of it after the interpreter started: imports, load, resume)")
                except Exception as exc:        # a mode not there yet: say which and why
                    parts.append(f"{mode}: n/a ({str(exc).splitlines()[0]})")
            ours = "; ".join(parts)
        theirs = ""
        if not self.args.skip_qemu and self.qemu_file.exists():
            best = min(qemu_side.restore(self.image, self.vmlinux, IDLE, self.qemu_extra, self.qemu_file)
                       for _ in range(3))
            theirs = f"{ms(best)} from process start (-incoming, until query-status says running)"
        self.row("restore to running", ours, theirs)

    def run(self) -> None:
        def timed(argv: list[str]) -> float:
            started = time.monotonic()
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
            if done.returncode != 0:
                raise RuntimeError(done.stderr.decode(errors="replace").strip().splitlines()[-1:])
            return time.monotonic() - started

        pyvmm = [sys.executable, "-m", "pyvmm.cli", "run", "--accel", "tcg", "--memory", "256M"]
        cold = min(timed([*pyvmm, "--cold", "--", "true"]) if self._has_warm() else timed([*pyvmm, "--", "true"])
                   for _ in range(2))
        if self._has_warm():
            timed([*pyvmm, "--warm", "--", "true"])     # the warm snapshot is made on first use: not timed
            warm = min(timed([*pyvmm, "--warm", "--", "true"]) for _ in range(3))
            ours = (f"warm snapshot {warm:.2f} s (`pyvmm run -- true`, the default), "
                    f"cold boot {cold:.2f} s (`--cold`)")
        else:
            ours = f"cold boot {cold:.2f} s; warm snapshot n/a (`pyvmm run --cold` not in this checkout)"
        theirs = ""
        if not self.args.skip_qemu:
            argv = [qemu_side.QEMU, "-M", "microvm", "-accel", "tcg", "-m", "256", "-smp", "1", "-nodefaults",
                    "-no-reboot", "-display", "none", "-serial", "stdio", "-kernel", self.vmlinux,
                    "-initrd", str(self.image.initramfs),
                    "-append", self.image.command_line(["true"], extra=self.qemu_extra)]
            theirs = f"cold boot {min(timed(argv) for _ in range(2)):.2f} s (microvm, PVH vmlinux)"
        self.row("run -- true", ours, theirs)

    def _has_warm(self) -> bool:
        """Whether `pyvmm run` starts from the warm snapshot (and takes --cold to boot instead)."""
        done = subprocess.run([sys.executable, "-m", "pyvmm.cli", "run", "--help"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
        return "--cold" in done.stdout

    def migration(self) -> None:
        for name, command in (("idle", IDLE), ("dirtying 100 MiB loop", DIRTYING)):
            try:
                progress = pyvmm_side.migrate(command, self.dir / "pyvmm-migrate.sock")
                ours = (f"total {ms(progress.total_s)}, downtime {progress.downtime_ms:.0f} ms, "
                        f"{progress.round} round(s), {mib(progress.bytes_sent)} sent ({progress.mode}); "
                        f"downtime: {progress.downtime_line()}")
            except ImportError as exc:
                ours = missing("pyvmm.migration", exc)
            theirs = ""
            if not self.args.skip_qemu:
                info = qemu_side.migrate(self.image, self.vmlinux, command, self.qemu_extra)
                theirs = (f"total {info['total-time']} ms, downtime {info['downtime']} ms, "
                          f"{info['ram'].get('dirty-sync-count', '?')} sync(s), {mib(info['ram']['transferred'])} sent")
            self.row(f"migration ({name})", ours, theirs)

    def memory(self) -> None:
        count = self.args.clones
        booted = pyvmm_side.booted_memory(IDLE, count)
        if self.state.exists():
            try:
                clones = pyvmm_side.clones_memory(self.state, self.mem, count)
                forked = pyvmm_side.clones_memory_zygote(self.state, self.mem, count)
                ours = (f"{count} clones {mib(clones * 1024)} total PSS, {mib(forked * 1024)} forked from one "
                        f"zygote; {count} booted {mib(booted * 1024)} (3 booted: {mib(booted * 1024 * 3 / count)})")
            except Exception as exc:
                ours = f"{count} booted {mib(booted * 1024)}; clones n/a ({str(exc).splitlines()[0]})"
        else:
            ours = f"{count} booted {mib(booted * 1024)}; clones n/a (no pyvmm snapshot)"
        theirs = ""
        if not self.args.skip_qemu:
            theirs = f"{count} booted {mib(qemu_side.booted_memory(self.image, self.vmlinux, IDLE, self.qemu_extra, count) * 1024)}"
        self.row(f"memory ({count} VMs)", ours, theirs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-qemu", action="store_true")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--clones", type=int, default=10)
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown row(s): {', '.join(unknown)}")
    if "restore" in rows and "snapshot" not in rows:
        rows.insert(0, "snapshot")      # restore and memory read the snapshot this run takes
    bench = Bench(args)
    try:
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
        if not args.skip_qemu:
            print(f"QEMU: {subprocess.run([qemu_side.QEMU, '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
        print(f"guest: Linux {bench.image.kernel_version}, 256 MiB, 1 vCPU, software CPU (pyvmm tcg; QEMU tcg microvm)")
        for row in ROWS:
            if row in rows:
                log(f"snapshot.py: {row}")
                getattr(bench, row)()
    finally:
        shutil.rmtree(bench.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
