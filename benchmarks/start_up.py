#!/usr/bin/env python3
"""VMM start-up: pyvmm vs QEMU, from spawning the process to the guest's first instructions.

The guest is the smallest there is (benchmarks/guests/first_io.S): a PVH ELF whose first
instructions write 0x01 to port 0x610 and then leave through the debug-exit port. Both VMMs
boot it directly (pyvmm `run --kernel`; QEMU microvm `-kernel`, its fastest direct boot: qboot
jumps to the PVH entry), with 256 MiB and one vCPU, on the software CPU (pyvmm --accel tcg:
Unicorn; QEMU -accel tcg) and on KVM where /dev/kvm works. So what is timed is the VMM's own
start-up: the process, its imports or libraries, the machine built, the kernel loaded, and
(for QEMU) its firmware.

Per run, from outside the VMM process, the same way for both VMMs (as benchmarks/boot.py):
  to guest  seconds from spawning the VMM to the guest's write to port 0x610 (QEMU: an
            isa-debugcon there, writing to a pipe; pyvmm: its unmodified CLI in a child whose
            port-0x610 device writes to the same kind of pipe)
  to exit   seconds from spawning to the process's exit (the guest's debug exit)
  RSS       the process's peak RSS (wait4 ru_maxrss)
Medians of --repeat runs, configurations interleaved.

Runs on Debian 12 with Python 3.11 as root; installs binutils and qemu-system-x86 with
apt-get when they are missing. Take measurements on an otherwise idle machine: the script
prints the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # this repo's pyvmm, installed or not

from boot import PYVMM_HOOK  # noqa: E402  (the 0x610 hook of the pyvmm child, shared)
from exit_roundtrip import ensure_tools  # noqa: E402

GUEST_SOURCE = REPO / "benchmarks" / "guests" / "first_io.S"
LINKER_SCRIPT = REPO / "benchmarks" / "guests" / "pvh.ld"
MEMORY_MIB = 256
DEBUG_EXIT_OK = 1  # the guest debug-exits with 0: status (0 << 1) | 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Config:
    name: str
    vmm: str     # pyvmm | qemu
    accel: str   # tcg | kvm

    def argv(self, kernel: str, fd: int) -> list[str]:
        if self.vmm == "pyvmm":
            return [sys.executable, "-c", PYVMM_HOOK, "run", "--accel", self.accel, "--memory", f"{MEMORY_MIB}M",
                    "--cpus", "1", "--kernel", kernel]
        return ["qemu-system-x86_64", "-M", "microvm", "-accel", self.accel, "-m", str(MEMORY_MIB), "-smp", "1",
                "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-chardev", f"file,id=started,path=/dev/fd/{fd}", "-device", "isa-debugcon,iobase=0x610,chardev=started",
                "-kernel", kernel]


@dataclasses.dataclass
class Run:
    to_guest: float
    to_exit: float
    maxrss_kib: int


def run_once(config: Config, kernel: str, timeout: float) -> Run:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    started_r, started_w = os.pipe()
    env["PYVMM_BENCH_NOTIFY_FD"] = str(started_w)
    argv = config.argv(kernel, started_w)
    started_at: list[float] = []
    output: list[bytes] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            pass_fds=(started_w,), env=env)
    os.close(started_w)

    def read_started() -> None:
        with os.fdopen(started_r, "rb", buffering=0) as f:
            if f.read(1):
                started_at.append(time.monotonic())
            f.read()

    readers = [threading.Thread(target=read_started, daemon=True),
               threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)]
    for reader in readers:
        reader.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    t_exit = time.monotonic()
    killer.cancel()
    for reader in readers:
        reader.join(10)
    code = os.waitstatus_to_exitcode(status)
    what = shlex.join(config.argv(kernel, 0)).replace(shlex.quote(PYVMM_HOOK), "<hook>")
    tail = b"".join(output)[-2000:].decode(errors="replace")
    if code != DEBUG_EXIT_OK or not started_at:
        raise SystemExit(f"start_up: {config.name}: status {code}, {'a' if started_at else 'no'} write to port "
                         f"0x610: {what}\n{tail}")
    return Run(started_at[0] - t0, t_exit - t0, usage.ru_maxrss)


def kvm_usable() -> str | None:
    """None if /dev/kvm can run a guest here, else why not."""
    try:
        from pyvmm.kvm import Kvm

        Kvm().close()
    except Exception as exc:  # noqa: BLE001 (any failure means: no KVM rows)
        return str(exc).splitlines()[0]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", "-r", type=int, default=10, metavar="R", help="runs per configuration (median; default 10)")
    ap.add_argument("--skip-qemu", action="store_true", help="measure pyvmm only")
    ap.add_argument("--accel", choices=("tcg", "kvm", "both"), default="both",
                    help="which CPU backends (default both; kvm only where /dev/kvm works)")
    ap.add_argument("--timeout", type=float, default=60, metavar="S", help="seconds allowed per run (default 60)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    ensure_tools(need_qemu=not args.skip_qemu)
    from pyvmm.guests import build_source

    kernel = str(build_source(GUEST_SOURCE, 32, linker_script=LINKER_SCRIPT))
    accels = ["tcg", "kvm"] if args.accel == "both" else [args.accel]
    if "kvm" in accels and (why := kvm_usable()) is not None:
        log(f"no KVM rows: {why}")
        accels.remove("kvm")
    if not accels:
        raise SystemExit("start_up: nothing to measure (no usable /dev/kvm)")
    configs = [Config(f"{vmm} {accel}", vmm, accel) for accel in accels
               for vmm in (("pyvmm",) if args.skip_qemu else ("pyvmm", "qemu"))]

    for config in configs:  # one unmeasured run each: caches (bytecode, probes) and the page cache warm
        run_once(config, kernel, args.timeout)
    load = os.getloadavg()
    runs: dict[str, list[Run]] = {c.name: [] for c in configs}
    for r in range(args.repeat):
        for config in configs:  # interleaved: drifting host load hits every configuration alike
            run = run_once(config, kernel, args.timeout)
            runs[config.name].append(run)
            log(f"run {r + 1}/{args.repeat}: {config.name}: to guest {run.to_guest * 1000:.0f} ms, "
                f"to exit {run.to_exit * 1000:.0f} ms")
    load_after = os.getloadavg()

    def med(name: str, field: str) -> float:
        return statistics.median(getattr(run, field) for run in runs[name])

    def spread(name: str, field: str) -> str:
        values = [getattr(run, field) * 1000 for run in runs[name]]
        return f"{min(values):.0f}-{max(values):.0f}"

    print(f"VMM start-up: spawn -> the first guest instructions (a PVH guest's write to port 0x610) and -> exit; "
          f"{MEMORY_MIB} MiB, 1 vCPU; median of {args.repeat} runs per configuration, interleaved")
    print(f"host: {os.cpu_count()} CPUs, load average {load[0]:.2f} before, {load_after[0]:.2f} after; "
          f"guest: {pathlib.Path(kernel).name}")
    print()
    print(f"{'configuration':<12} {'to guest (ms)':>14} {'(runs)':>11} {'to exit (ms)':>13} {'(runs)':>11} {'peak RSS (MiB)':>15}")
    for c in configs:
        print(f"{c.name:<12} {med(c.name, 'to_guest') * 1000:>14.0f} {spread(c.name, 'to_guest'):>11} "
              f"{med(c.name, 'to_exit') * 1000:>13.0f} {spread(c.name, 'to_exit'):>11} "
              f"{med(c.name, 'maxrss_kib') / 1024:>15.0f}")
    if not args.skip_qemu:
        print()
        for accel in accels:
            py, qemu = f"pyvmm {accel}", f"qemu {accel}"
            print(f"pyvmm / QEMU microvm, {accel}: to guest {med(py, 'to_guest') / med(qemu, 'to_guest'):.2f}x, "
                  f"to exit {med(py, 'to_exit') / med(qemu, 'to_exit'):.2f}x")
    print()
    print("command lines (N: a pipe to this script):")
    for c in configs:
        print(f"  {c.name}: " + shlex.join(c.argv(kernel, 0)).replace(shlex.quote(PYVMM_HOOK), "<hook>")
              .replace("/dev/fd/0", "/dev/fd/N"))
    print("  <hook>: pyvmm.cli.main with its port-0x610 device writing to the pipe (benchmarks/boot.py's PYVMM_HOOK)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
