#!/usr/bin/env python3
"""Linux boot time and VMM memory: pyvmm vs QEMU, same kernel, initramfs, command line, accelerator kind.

Every configuration boots pyvmm's default Debian guest (`pyvmm image build`: the stock
bzImage and pyvmm's busybox initramfs) with the same kernel command line, including the
`pyvmm.cmd=` token that makes the guest's /init run --command and power off and the
`tsc=nowatchdog` pyvmm's software CPU adds to Linux command lines, 256 MiB of
RAM, one vCPU and a software CPU (pyvmm `--accel tcg`: Unicorn; QEMU `-accel tcg`).

Per run, all from outside the VMM process, in the same way for both VMMs:
  to init   seconds from spawning the VMM process to the guest's /init writing 0x01 to
            I/O port 0x610 (the "init started" event; /init writes it after loading its
            modules, just before it runs the command).  QEMU gets an `isa-debugcon` at
            0x610 whose chardev is a pipe to this script; pyvmm runs its unmodified CLI in
            a child that hooks the port's device (GuestNotify) to write to the same kind of
            pipe.  A reader thread timestamps the first byte.
  to exit   seconds from spawning to the process's exit (the guest powered off).
  VMM RSS   the process's peak RSS (wait4 ru_maxrss).
  w/o guest peak of (VmRSS - guest RAM RSS), sampled every --sample-interval s from
            /proc: pyvmm's guest RAM is a memfd (RssShmem in /proc/PID/status), QEMU's the
            anonymous mapping in /proc/PID/smaps whose size is the guest RAM size.
  guest     guest RAM resident at the last sample (what the guest touched).
A further run per configuration times a busybox shell loop in the guest's user space:
the guest prints LOOP-START, counts to --loop-iterations, prints LOOP-END; this script
timestamps the two lines as they arrive on the console (busybox date has no %N, and a
host clock does not depend on the guest's timekeeping) -> loop iterations per second.
Another times console output: the guest prints CONSOLE-START, runs `seq 1 --console-lines`
(default 20000: 108,894 bytes) on its serial console (ttyS0, the kernel's console), prints
CONSOLE-END; the seconds between the two lines' arrival on the VMM's stdout, every line
checked. The SMP rows (--smp, default 2) boot pyvmm with `--cpus 2` and QEMU microvm + PVH
vmlinux with `-smp 2` (QEMU's fastest boot) to init and power-off, next to the 1-vCPU rows.
`--source` adds a pyvmm row that runs the modules scripts/compile builds from their Python
source (PYVMM_COMPILED=0, pyvmm/compiled.py): what the mypyc build is worth, in the same run.
`--quick`: one run, short loop and console runs (about 4 minutes on 2 cores at a load average of 11).

Runs on Debian 12 with Python 3.11 as root; installs qemu-system-x86 with apt-get when
it is missing, and builds the guest image on first use (a few minutes, network).
Take measurements on an otherwise idle machine: the script prints the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parent.parent
SRC = REPO / "src"
sys.path.insert(0, str(SRC))  # this repo's pyvmm, installed or not

MEMORY_MIB = 256
QEMU = "qemu-system-x86_64"
EXIT_LINE = re.compile(rb"pyvmm: exit status (\d+)")
LOOP_START, LOOP_END = b"LOOP-START", b"LOOP-END"
CONSOLE_START, CONSOLE_END = b"CONSOLE-START", b"CONSOLE-END"

# Run in the pyvmm child: the unmodified CLI, with the 0x610 device reporting "init started"
# on the inherited fd PYVMM_BENCH_NOTIFY_FD (one byte, written from the callback the device
# calls right after it records init_started_at).
PYVMM_HOOK = """\
import os, sys
try:  # what pyvmm.cli.main does before it imports anything else (not in checkouts before start_up.py)
    from pyvmm import start_up
    start_up.begin()
except ImportError:
    pass
import pyvmm.builder as builder
from pyvmm.devices.legacy import GuestNotify
fd = int(os.environ.pop("PYVMM_BENCH_NOTIFY_FD"))
class BenchGuestNotify(GuestNotify):
    def __init__(self, on_init_started=None):
        def started():
            os.write(fd, b"\\x01")
            if on_init_started is not None:
                on_init_started()
        super().__init__(started)
if builder.GuestNotify is not GuestNotify:
    sys.exit("boot.py: pyvmm.builder no longer uses GuestNotify; update benchmarks/boot.py")
builder.GuestNotify = BenchGuestNotify
from pyvmm.cli import main
sys.argv[0] = "pyvmm"
status = main(sys.argv[1:])
try:  # how the pyvmm command ends (not in checkouts before start_up.exit_process)
    from pyvmm.start_up import exit_process
except ImportError:
    sys.exit(status)
exit_process(status)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- setup -------------------------------------------------------------------------


def ensure_qemu() -> None:
    if shutil.which(QEMU):
        return
    if os.geteuid() != 0:
        sys.exit(f"boot.py: {QEMU} missing; apt-get install qemu-system-x86, or use --skip-qemu")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86"]
    log("installing qemu-system-x86")
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


# --- configurations ------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    name: str
    vmm: str                                      # "pyvmm" | "qemu"
    argv: Callable[[list[str], int], list[str]]   # (guest argv, notify fd) -> process argv
    shown: Callable[[list[str]], list[str]]       # the command line to print (fd -> N)
    kind: str = ""                                # "direct" (no in-guest decompression) | "firmware"
    cpus: int = 1                                 # vCPUs (the SMP rows: --smp)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra environment for the VMM


def tcg_linux_args() -> str:
    """What pyvmm's software CPU adds to a Linux kernel command line (tsc=nowatchdog); QEMU's
    guests get it too, so that both VMMs boot the same command line."""
    from pyvmm.accel.tcg.accelerator import TcgAccelerator

    return TcgAccelerator.linux_cmdline


def make_configs(image, vmlinux: str, tsc_khz: int, skip_qemu: bool, smp: int = 1,
                 unplaced: bool = False, source: bool = False) -> list[Config]:
    """The 1-vCPU configurations, then (smp > 1) pyvmm and QEMU's fastest direct boot with `smp` vCPUs;
    `unplaced`: also pyvmm with its threads where the kernel puts them (PYVMM_TCG_HOST_CPU=any);
    `source`: also pyvmm with its compiled modules taken from their Python source (PYVMM_COMPILED=0)."""
    def append(guest: list[str], extra: str = "") -> str:
        return image.command_line(guest, extra=extra)

    def pyvmm(cpus: int):
        def argv(guest: list[str], fd: int) -> list[str]:
            return [sys.executable, "-c", PYVMM_HOOK, *shown(guest)[3:]]

        def shown(guest: list[str]) -> list[str]:
            return ["python3", "-m", "pyvmm.cli", "run", "--cold", "--accel", "tcg", "--memory", f"{MEMORY_MIB}M",
                    "--cpus", str(cpus), "--", *guest]

        return argv, shown

    configs = [Config("pyvmm: PVH, vmlinux from the host", "pyvmm", *pyvmm(1), "pyvmm")]
    if unplaced:
        configs.append(Config("pyvmm: the same, threads unplaced", "pyvmm", *pyvmm(1), "pyvmm-unplaced",
                              env={"PYVMM_TCG_HOST_CPU": "any"}))
    if source:
        configs.append(Config("pyvmm: the same, from Python source", "pyvmm", *pyvmm(1), "pyvmm-source",
                              env={"PYVMM_COMPILED": "0"}))
    if smp > 1:
        configs.append(Config(f"pyvmm: PVH, {smp} vCPUs", "pyvmm", *pyvmm(smp), "pyvmm-smp", smp))
    if skip_qemu:
        return configs

    def qemu(machine: str, kernel: str, tsc: bool, cpus: int = 1):
        extra = f"{tcg_linux_args()} tsc_early_khz={tsc_khz}" if tsc else tcg_linux_args()

        def argv(guest: list[str], fd: int) -> list[str]:
            return [QEMU, "-M", machine, "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", str(cpus),
                    "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
                    "-kernel", kernel, "-initrd", str(image.initramfs), "-append", append(guest, extra),
                    "-chardev", f"file,id=bootnotify,path=/dev/fd/{fd}",
                    "-device", "isa-debugcon,iobase=0x610,chardev=bootnotify"]

        def shown(guest: list[str]) -> list[str]:
            return ["file,id=bootnotify,path=/dev/fd/N" if a.startswith("file,id=bootnotify") else a
                    for a in argv(guest, 0)]

        return argv, shown

    kernel = str(image.kernel)
    for name, machine, path, tsc, kind in (
        ("QEMU q35: SeaBIOS + bzImage", "q35", kernel, False, "firmware"),
        ("QEMU microvm: qboot + bzImage", "microvm", kernel, True, "bzimage"),
        ("QEMU microvm: qboot + PVH vmlinux", "microvm", vmlinux, True, "direct"),
        ("QEMU q35: SeaBIOS + PVH vmlinux", "q35", vmlinux, False, "direct"),
    ):
        argv, shown = qemu(machine, path, tsc)
        configs.append(Config(name + (" (*)" if tsc else ""), "qemu", argv, shown, kind))
    if smp > 1:  # microvm + PVH vmlinux: QEMU's fastest boot in the measurements of issue 17
        configs.append(Config(f"QEMU microvm: PVH vmlinux, {smp} vCPUs (*)", "qemu", *qemu("microvm", vmlinux, True, smp),
                              "smp", smp))
    return configs


# --- one run -----------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    to_init: float
    to_exit: float
    maxrss_kib: int             # wait4 ru_maxrss
    vmm_peak_kib: int           # max over samples of VmRSS - guest RAM RSS
    guest_kib: int              # guest RAM RSS at the last sample
    samples: int
    lines: list[tuple[float, bytes]]
    cpu_s: float                # user + system CPU seconds of the VMM process


def _status_kib(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith((b"VmRSS:", b"VmHWM:", b"RssShmem:")):
                key, value = line.split(b":", 1)
                values[key.decode()] = int(value.split()[0])
    return values


def _anon_mapping_rss_kib(pid: int, size_kib: int) -> int:
    """RSS of the anonymous mapping(s) of exactly `size_kib` (QEMU's guest RAM block)."""
    total, in_match, size = 0, False, 0
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            if line[:1] in b"0123456789abcdef" and b"-" in line.split(b" ", 1)[0]:
                fields = line.split()
                in_match = len(fields) < 6  # anonymous: no path
                size = 0
            elif in_match and line.startswith(b"Size:"):
                size = int(line.split()[1])
            elif in_match and line.startswith(b"Rss:") and size == size_kib:
                total += int(line.split()[1])
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int, vmm: str, interval: float):
        super().__init__(daemon=True)
        self.pid, self.vmm, self.interval = pid, vmm, interval
        self.stop = threading.Event()
        self.vmm_peak = self.guest = self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status = _status_kib(self.pid)
                if "VmRSS" not in status:  # exiting
                    break
                if self.vmm == "pyvmm":
                    guest = status.get("RssShmem", 0)
                else:
                    guest = _anon_mapping_rss_kib(self.pid, MEMORY_MIB * 1024)
                if self.stop.is_set():
                    break
                self.vmm_peak = max(self.vmm_peak, status["VmRSS"] - guest)
                self.guest = guest
                self.samples += 1
            except (OSError, ValueError):
                break
            self.stop.wait(self.interval)


def run_once(config: Config, guest: list[str], *, timeout: float, interval: float) -> Run:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
               **config.env)
    notify_r, notify_w = os.pipe()
    argv = config.argv(guest, notify_w)
    env["PYVMM_BENCH_NOTIFY_FD"] = str(notify_w)
    init_at: list[float] = []
    lines: list[tuple[float, bytes]] = []
    stderr: list[bytes] = []

    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(notify_w,), env=env)
    os.close(notify_w)

    def read_notify() -> None:
        with os.fdopen(notify_r, "rb", buffering=0) as f:
            if f.read(1):
                init_at.append(time.monotonic())
            f.read()

    def read_stdout() -> None:
        for line in iter(proc.stdout.readline, b""):
            lines.append((time.monotonic(), line))

    def read_stderr() -> None:
        stderr.append(proc.stderr.read())

    threads = [threading.Thread(target=fn, daemon=True) for fn in (read_notify, read_stdout, read_stderr)]
    for t in threads:
        t.start()
    sampler = Sampler(proc.pid, config.vmm, interval)
    sampler.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    _, wait_status, rusage = os.wait4(proc.pid, 0)
    t_exit = time.monotonic()
    killer.cancel()
    sampler.stop.set()
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    for t in threads:
        t.join(10)
    sampler.join(10)

    console = b"".join(line for _, line in lines)
    what = f"{config.name}: {shlex.join(config.shown(guest))}"
    tail = (f"\n--- console (end) ---\n{console[-3000:].decode(errors='replace')}"
            f"\n--- stderr (end) ---\n{b''.join(stderr)[-2000:].decode(errors='replace')}")
    if warned := kernel_warnings(console):
        raise SystemExit(f"boot.py: {warned}: {what}{tail}")
    if t_exit - t0 >= timeout:
        raise SystemExit(f"boot.py: no power-off after {timeout:g} s: {what}{tail}")
    match = EXIT_LINE.search(console)
    if match is None:
        raise SystemExit(f"boot.py: the guest did not report the command's exit status (VMM status "
                         f"{proc.returncode}): {what}{tail}")
    expected = int(match.group(1)) if config.vmm == "pyvmm" else 0
    if proc.returncode != expected:
        raise SystemExit(f"boot.py: VMM exited with {proc.returncode}, expected {expected}: {what}{tail}")
    if not init_at:
        raise SystemExit(f"boot.py: no 'init started' write to port 0x610 seen: {what}{tail}")
    return Run(init_at[0] - t0, t_exit - t0, rusage.ru_maxrss, sampler.vmm_peak, sampler.guest, sampler.samples,
               lines, rusage.ru_utime + rusage.ru_stime)


def kernel_warnings(console: bytes) -> str | None:
    """The kernel-warning gate of the Linux tests (pyvmm.images.kernel_warnings), in one line:
    figures from a guest that stalled or warned are not figures. The guests boot with `quiet`,
    so the gate sees errors and worse here."""
    from pyvmm.images.kernel_warnings import find_kernel_warnings

    found = find_kernel_warnings(console)
    return f"the guest kernel printed {len(found)} warning line(s), the first: {found[0]}" if found else None


def marked_seconds(run: Run, start_line: bytes, end_line: bytes, config: Config) -> float:
    """Host seconds between the arrival of console lines `start_line` and `end_line`."""
    start = next((t for t, line in run.lines if line.rstrip() == start_line), None)
    end = next((t for t, line in run.lines if line.rstrip() == end_line), None)
    if start is None or end is None:
        raise SystemExit(f"boot.py: {config.name}: no {start_line.decode()}/{end_line.decode()} lines on the console")
    return end - start


def loop_rate(run: Run, iterations: int, config: Config) -> float:
    return iterations / marked_seconds(run, LOOP_START, LOOP_END, config)


def console_seconds(run: Run, lines: int, config: Config) -> float:
    """Seconds the guest took to put `seq 1 LINES` on its serial console, all of it seen by the host
    (each line is checked: a VMM that lost or reordered output has no figure)."""
    seconds = marked_seconds(run, CONSOLE_START, CONSOLE_END, config)
    got = [line.rstrip() for _, line in run.lines]
    begin = got.index(CONSOLE_START) + 1
    if got[begin:begin + lines + 1] != [str(i).encode() for i in range(1, lines + 1)] + [CONSOLE_END]:
        raise SystemExit(f"boot.py: {config.name}: the console did not show `seq 1 {lines}` line by line")
    return seconds


def console_bytes(lines: int) -> int:
    return sum(len(str(i)) + 1 for i in range(1, lines + 1))


def console_command(lines: int) -> list[str]:
    return ["sh", "-c", f"echo {CONSOLE_START.decode()}; seq 1 {lines}; echo {CONSOLE_END.decode()}"]


def loop_command(iterations: int) -> list[str]:
    return ["sh", "-c", f"echo {LOOP_START.decode()}; i=0; while [ $i -lt {iterations} ]; do i=$((i+1)); done; "
                        f"echo {LOOP_END.decode()}"]


def parallel_loop_command(iterations: int, jobs: int) -> list[str]:
    """`jobs` shell loops at once, `iterations` in all: work for every vCPU of an SMP guest."""
    each = max(iterations // jobs, 1)
    return ["sh", "-c", f"echo {LOOP_START.decode()}; for j in $(seq 1 {jobs}); do "
                        f"(i=0; while [ $i -lt {each} ]; do i=$((i+1)); done) & done; wait; echo {LOOP_END.decode()}"]


# --- report ----------------------------------------------------------------------------


def mib(kib: float) -> float:
    return kib / 1024


def busy_cpu_seconds() -> float:
    """CPU seconds the whole host has spent not idle (/proc/stat), for the background-load check."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", "-r", type=int, default=3, metavar="R", help="runs per configuration (median; default 3)")
    ap.add_argument("--skip-qemu", action="store_true", help="measure pyvmm only")
    ap.add_argument("--unplaced", action="store_true",
                    help="add a pyvmm row whose threads are not kept on one host CPU (PYVMM_TCG_HOST_CPU=any)")
    ap.add_argument("--source", action="store_true",
                    help="add a pyvmm row that runs the modules it compiles from their Python source (PYVMM_COMPILED=0)")
    ap.add_argument("--command", default="true", metavar="CMD",
                    help="command the guest runs (split like a shell; default 'true'), e.g. 'uname -a'")
    ap.add_argument("--loop-iterations", type=int, default=20_000, metavar="N",
                    help="shell-loop iterations under pyvmm for the CPU figure, 0 to skip it (default 20000)")
    ap.add_argument("--qemu-loop-iterations", type=int, default=200_000, metavar="N",
                    help="shell-loop iterations under QEMU, ~10x faster (default 200000)")
    ap.add_argument("--console-lines", type=int, default=20_000, metavar="N",
                    help="the console row: `seq 1 N` on the guest's serial console, 0 to skip it (default 20000)")
    ap.add_argument("--smp", type=int, default=2, metavar="N",
                    help="vCPUs of the SMP boot rows (pyvmm and QEMU microvm PVH), 1 to skip them (default 2)")
    ap.add_argument("--quick", action="store_true",
                    help="one run, 2000 loop iterations (QEMU 20000), 2000 console lines")
    ap.add_argument("--sample-interval", type=float, default=0.2, metavar="S",
                    help="seconds between /proc samples of RSS (default 0.2)")
    ap.add_argument("--timeout", type=float, default=300, metavar="S", help="seconds allowed per run (default 300)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat, args.loop_iterations = 1, min(args.loop_iterations, 2_000)
        args.qemu_loop_iterations, args.console_lines = min(args.qemu_loop_iterations, 20_000), min(args.console_lines, 2_000)
    if args.repeat < 1 or args.loop_iterations < 0 or args.qemu_loop_iterations < 1 or args.console_lines < 0 \
            or args.smp < 1:
        ap.error("--repeat, --smp and --qemu-loop-iterations must be at least 1, --loop-iterations and "
                 "--console-lines at least 0")
    guest = shlex.split(args.command)
    if not guest:
        ap.error("--command is empty")

    if not args.skip_qemu:
        ensure_qemu()
    from pyvmm.images import default_image
    from pyvmm.loader.linux import extract_vmlinux
    from pyvmm.loader.linux.extract import vmlinux_from_bzimage
    from pyvmm.accel.tcg.host_tsc import host_tsc_hz

    image = default_image()
    vmlinux = str(extract_vmlinux(image.kernel))  # pyvmm caches it on first use; warm the cache here
    t = time.monotonic()
    vmlinux_from_bzimage(image.kernel.read_bytes())
    extract_s = time.monotonic() - t
    tsc_khz = host_tsc_hz() // 1000
    configs = make_configs(image, vmlinux, tsc_khz, args.skip_qemu, args.smp, args.unplaced, args.source)

    load = os.getloadavg()
    log(f"load average before the runs: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    busy0, wall0, self0 = busy_cpu_seconds(), time.monotonic(), time.process_time()
    vmm_cpu = 0.0
    boots: dict[str, list[Run]] = {c.name: [] for c in configs}
    loops: dict[str, list[float]] = {c.name: [] for c in configs}
    consoles: dict[str, list[float]] = {c.name: [] for c in configs}
    parallel: dict[str, list[float]] = {c.name: [] for c in configs}
    parallel_jobs = max(args.smp, 2)
    for r in range(args.repeat):
        for c in configs:  # interleaved: drifting host load hits every configuration alike
            log(f"run {r + 1}/{args.repeat}: {c.name}: {args.command}")
            run = run_once(c, guest, timeout=args.timeout, interval=args.sample_interval)
            boots[c.name].append(run)
            vmm_cpu += run.cpu_s
            log(f"  to init {run.to_init:.2f} s, to exit {run.to_exit:.2f} s, RSS {mib(run.maxrss_kib):.0f} MiB")
            if args.loop_iterations and c.cpus == 1:
                n = args.loop_iterations if c.vmm == "pyvmm" else args.qemu_loop_iterations
                log(f"run {r + 1}/{args.repeat}: {c.name}: shell loop x{n}")
                lrun = run_once(c, loop_command(n), timeout=args.timeout, interval=args.sample_interval)
                loops[c.name].append(loop_rate(lrun, n, c))
                vmm_cpu += lrun.cpu_s
                log(f"  {loops[c.name][-1]:,.0f} iterations/s")
            if args.console_lines and c.cpus == 1:
                log(f"run {r + 1}/{args.repeat}: {c.name}: seq 1 {args.console_lines} on the console")
                crun = run_once(c, console_command(args.console_lines), timeout=args.timeout,
                                interval=args.sample_interval)
                consoles[c.name].append(console_seconds(crun, args.console_lines, c))
                vmm_cpu += crun.cpu_s
                log(f"  {consoles[c.name][-1]:.2f} s")
            # the parallel row: pyvmm with 1 vCPU and every SMP configuration
            if args.loop_iterations and (c.kind == "pyvmm" or c.cpus > 1):
                n = args.loop_iterations if c.vmm == "pyvmm" else args.qemu_loop_iterations
                log(f"run {r + 1}/{args.repeat}: {c.name}: {parallel_jobs} shell loops in parallel, x{n} in all")
                prun = run_once(c, parallel_loop_command(n, parallel_jobs), timeout=args.timeout,
                                interval=args.sample_interval)
                parallel[c.name].append(loop_rate(prun, n, c))
                vmm_cpu += prun.cpu_s
                log(f"  {parallel[c.name][-1]:,.0f} iterations/s")

    wall = time.monotonic() - wall0
    others = (busy_cpu_seconds() - busy0 - vmm_cpu - (time.process_time() - self0)) / wall

    def med(name: str, field: str) -> float:
        return statistics.median(getattr(run, field) for run in boots[name])

    print(f"Boot to /init and power-off, guest command {args.command!r}: median of {args.repeat} run(s) per "
          f"configuration, configurations interleaved")
    print(f"guest: Linux {image.kernel_version} ({image.kernel.name}, {image.initramfs.name}), {MEMORY_MIB} MiB, "
          f"1 vCPU (the SMP rows: {args.smp}), software CPU; host TSC {tsc_khz} kHz")
    print(f"host: {os.cpu_count()} CPUs, load average before {load[0]:.2f}; during the {wall:.0f} s of runs other "
          f"processes kept {max(others, 0):.2f} CPUs busy on average")
    if not args.skip_qemu:
        print(f"QEMU: {qemu_version()}")
    print()
    cols = f"{'configuration':<38} {'to init (s)':>11} {'to exit (s)':>11} {'VMM RSS':>8} {'w/o guest':>9} " \
           f"{'guest':>6}"
    if args.loop_iterations:
        cols += f" {'loop it/s':>10}"
    if args.console_lines:
        cols += f" {'console (s)':>11}"
    if args.loop_iterations:
        cols += f" {'par. it/s':>10}"
    print(cols)
    print(f"{'':<38} {'':>11} {'':>11} {'(MiB)':>8} {'RAM (MiB)':>9} {'(MiB)':>6}")
    print("-" * len(cols))
    for c in configs:
        line = (f"{c.name:<38} {med(c.name, 'to_init'):>11.2f} {med(c.name, 'to_exit'):>11.2f} "
                f"{mib(med(c.name, 'maxrss_kib')):>8.0f} {mib(med(c.name, 'vmm_peak_kib')):>9.0f} "
                f"{mib(med(c.name, 'guest_kib')):>6.0f}")
        if args.loop_iterations:
            line += f" {statistics.median(loops[c.name]):>10,.0f}" if loops[c.name] else f" {'-':>10}"
        if args.console_lines:
            line += f" {statistics.median(consoles[c.name]):>11.2f}" if consoles[c.name] else f" {'-':>11}"
        if args.loop_iterations:
            line += f" {statistics.median(parallel[c.name]):>10,.0f}" if parallel[c.name] else f" {'-':>10}"
        print(line)
    print()

    py = configs[0].name
    if not args.skip_qemu:
        direct = min((c for c in configs if c.kind == "direct"), key=lambda c: med(c.name, "to_exit"))
        firmware = next(c for c in configs if c.kind == "firmware")
        for label, other in (("fastest QEMU direct (PVH) boot", direct), ("QEMU firmware boot", firmware)):
            ratio = (f"pyvmm / {label} [{other.name}]: to init {med(py, 'to_init') / med(other.name, 'to_init'):.1f}x, "
                     f"to exit {med(py, 'to_exit') / med(other.name, 'to_exit'):.1f}x, "
                     f"RSS w/o guest RAM {med(py, 'vmm_peak_kib') / med(other.name, 'vmm_peak_kib'):.2f}x")
            if args.loop_iterations:
                ratio += f", loop speed {statistics.median(loops[py]) / statistics.median(loops[other.name]):.3f}x"
            if args.console_lines:
                ratio += (f", console time "
                          f"{statistics.median(consoles[py]) / statistics.median(consoles[other.name]):.2f}x")
            print(ratio)
    for kind, label in (("pyvmm-unplaced", "pyvmm threads unplaced / on one host CPU"),
                        ("pyvmm-source", "pyvmm from Python source / compiled")):
        variant = next((c.name for c in configs if c.kind == kind), None)
        if variant is None:
            continue
        line = (f"{label}: to init {med(variant, 'to_init') / med(py, 'to_init'):.2f}x, "
                f"to exit {med(variant, 'to_exit') / med(py, 'to_exit'):.2f}x")
        if loops[variant] and loops[py]:
            line += f", loop speed {statistics.median(loops[variant]) / statistics.median(loops[py]):.3f}x"
        if consoles[variant] and consoles[py]:
            line += f", console time {statistics.median(consoles[variant]) / statistics.median(consoles[py]):.2f}x"
        print(line)
    smp_py = next((c.name for c in configs if c.kind == "pyvmm-smp"), None)
    smp_qemu = next((c.name for c in configs if c.kind == "smp"), None)
    if smp_py:
        print(f"pyvmm {args.smp} vCPUs / pyvmm 1 vCPU: to init {med(smp_py, 'to_init') / med(py, 'to_init'):.2f}x, "
              f"to exit {med(smp_py, 'to_exit') / med(py, 'to_exit'):.2f}x"
              + (f", parallel loop speed {statistics.median(parallel[smp_py]) / statistics.median(parallel[py]):.2f}x"
                 if parallel[smp_py] and parallel[py] else ""))
    if smp_py and smp_qemu:
        print(f"pyvmm {args.smp} vCPUs / QEMU {args.smp} vCPUs [{smp_qemu}]: to init "
              f"{med(smp_py, 'to_init') / med(smp_qemu, 'to_init'):.2f}x, to exit "
              f"{med(smp_py, 'to_exit') / med(smp_qemu, 'to_exit'):.2f}x")
    print()

    print("per run (to init / to exit s, RSS MiB):")
    for c in configs:
        runs = "; ".join(f"{r.to_init:.2f}/{r.to_exit:.2f}/{mib(r.maxrss_kib):.0f}" for r in boots[c.name])
        extra = f"; loop it/s: {', '.join(f'{x:,.0f}' for x in loops[c.name])}" if loops[c.name] else ""
        extra += f"; console s: {', '.join(f'{x:.2f}' for x in consoles[c.name])}" if consoles[c.name] else ""
        extra += f"; parallel it/s: {', '.join(f'{x:,.0f}' for x in parallel[c.name])}" if parallel[c.name] else ""
        print(f"  {c.name}: {runs}{extra}")
    print()
    print("to init = process spawn -> the guest's /init writes 0x01 to port 0x610 (after loading its modules);")
    print("  QEMU: isa-debugcon at 0x610 -> pipe; pyvmm: its CLI in a child whose GuestNotify (0x610) writes to a pipe.")
    print("to exit = process spawn -> process exit (guest power-off). VMM RSS = peak RSS (wait4 ru_maxrss).")
    print(f"w/o guest RAM = peak of VmRSS - guest RAM RSS, sampled every {args.sample_interval:g} s; guest RAM = "
          f"pyvmm's memfd (RssShmem), QEMU's {MEMORY_MIB} MiB anonymous mapping (smaps).")
    print("guest = guest RAM resident at the last sample.")
    if args.loop_iterations:
        print(f"loop it/s = iterations of a busybox sh while loop in guest user space (pyvmm {args.loop_iterations}, "
              f"QEMU {args.qemu_loop_iterations}) / host time between")
        print("  the LOOP-START and LOOP-END console lines, in a separate boot.")
    if args.console_lines:
        print(f"console = host seconds between the CONSOLE-START and CONSOLE-END lines around `seq 1 "
              f"{args.console_lines}` ({console_bytes(args.console_lines):,} bytes)")
        print("  written by the guest to its serial console (ttyS0, a 16550 in both VMMs), in a separate boot; "
              "every line is checked.")
    if args.loop_iterations:
        print(f"par. it/s = the same loop as {parallel_jobs} shell loops at once, the same iterations in all, "
              "in a separate boot: pyvmm 1 vCPU and the SMP rows.")
    print("loop and console runs are 1-vCPU only; the SMP rows are boots to init and power-off (and the parallel loop).")
    print(f"pyvmm boots the vmlinux it extracted from the bzImage and cached (one-time extraction: {extract_s:.2f} s, "
          f"not in the runs).")
    if not args.skip_qemu:
        print("bzImage: QEMU's firmware loads the compressed kernel, which decompresses itself in the guest; "
              "PVH vmlinux: the ELF pyvmm extracted.")
        print(f"(*) microvm runs get tsc_early_khz={tsc_khz} appended (TSC calibration hangs some microvm boots "
              f"without it); pyvmm announces the TSC rate through CPUID.")
    print()
    print("command lines (/dev/fd/N: a pipe to this script):")
    for c in configs:
        print(f"  {c.name}:\n    " + "".join(f"{k}={v} " for k, v in c.env.items()) + shlex.join(c.shown(guest)))
    print(f"  pyvmm is run as `{sys.executable} -c <hook> run ...`: pyvmm.cli.main with the 0x610 hook above.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
