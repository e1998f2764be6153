#!/usr/bin/env python3
"""VM-exit round trips per second: pyvmm vs QEMU on the same KVM, same guest.

The guest is pyvmm's `exitbench` (Multiboot ELF32).  It runs N port writes
(outb 0x80), N port reads (inb 0x80) and N MMIO writes (to unassigned
0xD0000000), each loop bracketed by rdtsc, and prints the TSC ticks of each
loop.  Per-exit cost = ticks / N / TSC frequency: VMM start-up, firmware
(QEMU's SeaBIOS/qboot) and the guest's own printing are outside the brackets,
and both VMMs are measured the same way.  Medians over --repeat runs, the two
VMMs interleaved so that background load hits both alike.

As a check on the TSC rate the script also times whole runs with N and with 0
iterations and prints the wall-clock difference method's figure,
(T(N) - T(0)) / 3N, next to the TSC one.

Runs on a plain Debian 12 with Python 3.11 as root: installs binutils (to build
the guest) and qemu-system-x86 with apt-get when they are missing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
SRC = REPO / "src"
sys.path.insert(0, str(SRC))  # this repo's pyvmm, installed or not

KINDS = (
    ("pio", "PIO write (outb 0x80)"),
    ("pior", "PIO read (inb 0x80)"),
    ("mmio", "MMIO write (0xD0000000)"),
)
TSC_LINE = re.compile(r"exitbench: tsc pio=0x([0-9a-f]+) pior=0x([0-9a-f]+) mmio=0x([0-9a-f]+)")
DEBUG_EXIT_OK = 1  # exitbench debug-exits with 0: status (0 << 1) | 1
GUEST_MEMORY_MIB = 64

# QEMU machines: microvm boots through qboot in ~50 ms and, like pyvmm, has
# no PCI; pc boots SeaBIOS (~1.5 s here) and has the ioport80 dummy device.
# Boot time is outside the TSC brackets either way, so the choice only costs
# run time; microvm is the closer match to pyvmm's machine.
QEMU_MACHINES = ("microvm", "pc")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- setup -------------------------------------------------------------------------


def apt_install(packages: list[str]) -> None:
    if not packages:
        return
    if os.geteuid() != 0:
        sys.exit(f"exit_roundtrip: missing {', '.join(packages)}; install them (apt-get install {' '.join(packages)}) or run as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    log(f"installing: {' '.join(packages)}")
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        # A fresh image may have no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)


def ensure_tools(need_qemu: bool) -> None:
    packages = []
    if not (shutil.which("as") and shutil.which("ld")):
        packages.append("binutils")
    if need_qemu and not shutil.which("qemu-system-x86_64"):
        packages.append("qemu-system-x86")
    apt_install(packages)


def guest_tsc_khz() -> int:
    """The TSC rate KVM gives a new vCPU (QEMU leaves it alone unless told
    tsc-frequency=, so both VMMs' guests count at this rate)."""
    from pyvmm.kvm import Kvm

    kvm = Kvm()
    try:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                return vcpu.get_tsc_khz()
            finally:
                vcpu.close()
        finally:
            vm.close()
    finally:
        kvm.close()


# --- one run -----------------------------------------------------------------------


def pyvmm_cmd(kernel: str, append: str, timeout: float) -> list[str]:
    # A separate process, like QEMU: no state shared with this script.
    return [sys.executable, "-m", "pyvmm.cli", "run", "--accel", "kvm", "--kernel", kernel, "--append", append,
            "--memory", f"{GUEST_MEMORY_MIB}M", "--timeout", f"{timeout:g}"]


def qemu_cmd(kernel: str, append: str, machine: str) -> list[str]:
    return ["qemu-system-x86_64", "-M", machine, "-accel", "kvm", "-cpu", "host",
            "-m", str(GUEST_MEMORY_MIB), "-smp", "1",
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", kernel, "-append", append]


def run_once(cmd: list[str], timeout: float) -> tuple[float, tuple[int, int, int]]:
    """Run a VMM to the guest's debug exit: (wall seconds, TSC ticks per loop)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    try:
        # QEMU stays up after a KVM internal error, hence the timeout.
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"exit_roundtrip: timed out after {timeout:g} s: {shlex.join(cmd)}")
    wall = time.perf_counter() - t0
    match = TSC_LINE.search(proc.stdout)
    if proc.returncode != DEBUG_EXIT_OK or not match:
        raise SystemExit(f"exit_roundtrip: run failed (status {proc.returncode}): {shlex.join(cmd)}\n"
                         f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    return wall, tuple(int(g, 16) for g in match.groups())


# --- the benchmark ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", "-n", type=int, default=100_000, metavar="N",
                    help="exits per kind per run (default 100000)")
    ap.add_argument("--repeat", "-r", type=int, default=5, metavar="R", help="runs per VMM; medians are printed (default 5)")
    ap.add_argument("--skip-qemu", action="store_true", help="measure pyvmm only")
    ap.add_argument("--qemu-machine", choices=QEMU_MACHINES, default="microvm", help="QEMU -M (default microvm)")
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.repeat < 1:
        ap.error("--iterations and --repeat must be at least 1")
    n = args.iterations

    ensure_tools(need_qemu=not args.skip_qemu)
    from pyvmm.guests import build

    from pyvmm.kvm import KvmUnavailable

    kernel = str(build("exitbench"))
    try:
        tsc_khz = guest_tsc_khz()
    except KvmUnavailable as exc:
        raise SystemExit(f"exit_roundtrip: {exc}")
    # Generous: 3N exits at up to 200 us each, plus start-up / firmware.
    timeout = 60 + 3 * n * 200e-6
    append_n = f"pio={n} pior={n} mmio={n}"
    append_0 = "pio=0 pior=0 mmio=0"

    vmms = {"pyvmm": lambda a: pyvmm_cmd(kernel, a, timeout)}
    if not args.skip_qemu:
        vmms["QEMU"] = lambda a: qemu_cmd(kernel, a, args.qemu_machine)

    ticks = {name: [] for name in vmms}    # per run: (pio, pior, mmio) ticks
    wall_n = {name: [] for name in vmms}
    wall_0 = {name: [] for name in vmms}
    for r in range(args.repeat):
        for name, cmd in vmms.items():     # interleaved: drifting host load hits both
            log(f"run {r + 1}/{args.repeat}: {name} N={n}")
            wall, t = run_once(cmd(append_n), timeout + 30)
            ticks[name].append(t)
            wall_n[name].append(wall)
            wall, _ = run_once(cmd(append_0), timeout + 30)
            wall_0[name].append(wall)

    hz = tsc_khz * 1000.0
    med = {name: [statistics.median(run[i] for run in ticks[name]) for i in range(3)] for name in vmms}
    us = {name: [m / n / hz * 1e6 for m in med[name]] for name in vmms}

    print(f"VM-exit round trips: {n} exits per kind per run, median of {args.repeat} runs; "
          f"guest TSC {tsc_khz} kHz (KVM_GET_TSC_KHZ)")
    print("per exit = median in-guest TSC ticks of the loop / N / TSC rate (start-up and firmware excluded)")
    print()
    header = f"{'exit kind':<25} {'pyvmm µs/exit':>13} {'exits/s':>9}"
    if "QEMU" in vmms:
        header += f" {'QEMU µs/exit':>13} {'exits/s':>9} {'pyvmm/QEMU':>11}"
    print(header)
    print("-" * len(header))
    for i, (_, label) in enumerate(KINDS):
        p = us["pyvmm"][i]
        line = f"{label:<25} {p:>13.2f} {1e6 / p:>9,.0f}"
        if "QEMU" in vmms:
            q = us["QEMU"][i]
            line += f" {q:>13.2f} {1e6 / q:>9,.0f} {p / q:>11.2f}"
        print(line)

    print()
    print("raw medians (TSC ticks per loop of N exits; min-max over runs):")
    for name in vmms:
        parts = []
        for i, (key, _) in enumerate(KINDS):
            col = [run[i] for run in ticks[name]]
            parts.append(f"{key}={med[name][i]:,.0f} ({min(col):,}-{max(col):,})")
        print(f"  {name:<6} " + "  ".join(parts))
    print("check, wall-clock difference method (T(N) - T(0)) / 3N over whole runs (includes the guest's printing):")
    for name in vmms:
        tn, t0 = statistics.median(wall_n[name]), statistics.median(wall_0[name])
        diff_us = (tn - t0) / (3 * n) * 1e6
        tsc_us = sum(us[name]) / 3
        print(f"  {name:<6} T(N)={tn:.3f} s  T(0)={t0:.3f} s  -> {diff_us:.2f} µs/exit "
              f"(TSC method, mean of kinds: {tsc_us:.2f} µs; {100 * (diff_us / tsc_us - 1):+.1f}%)")

    print()
    print("commands (N runs; T(0) runs use the same with", repr(append_0) + "):")
    for name, cmd in vmms.items():
        print(f"  {name}: {shlex.join(cmd(append_n))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
