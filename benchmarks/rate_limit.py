#!/usr/bin/env python3
"""A disk rate limit being held: pyvmm's token bucket next to QEMU's throttling.bps-total, same run.

Each configuration boots pyvmm's default Debian guest on the software CPU (pyvmm `--accel tcg`,
QEMU `-accel tcg` with the same vmlinux, initramfs and kernel command line, 256 MiB, 1 vCPU)
with one virtio-blk disk on a raw image, and runs in the guest:

    dd if=/dev/vda of=/dev/null bs=1M count=WARM iflag=direct     drains any initial burst
    read t0 < /proc/uptime
    dd if=/dev/vda of=/dev/null bs=1M count=N skip=WARM iflag=direct
    read t1 < /proc/uptime

and reports N MiB / (t1 - t0) (the guest's uptime clock: both guests keep host time, and the
interval is seconds long, against a 10 ms resolution). The configurations:

  pyvmm, no limit        --disk IMG                     (what the guest and device manage unthrottled)
  pyvmm, RATE            --disk IMG,bps=RATE            (a bucket of one second's worth, refilled over 1 s)
  QEMU, RATE             -drive ...,throttling.bps-total=RATE -device virtio-blk-pci

The limit holds when the limited rows read close to RATE (and the unlimited row well above it).
Runs as root on Debian 12 (apt-get installs qemu-system-x86 when missing); the machine's load
average is printed, since the unlimited figure depends on it (the limited ones should not).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from boot import MEMORY_MIB, QEMU, SRC, ensure_qemu, kernel_warnings, log, qemu_version, tcg_linux_args  # noqa: E402

RESULT = re.compile(rb"@@RATE ([0-9.]+) ([0-9.]+)")
MIB = 1 << 20
PYVMM = "import sys; from pyvmm.cli import main; sys.argv[0] = 'pyvmm'; sys.exit(main(sys.argv[1:]))"


def guest_script(warm_mib: int, mib: int) -> str:
    return (f"dd if=/dev/vda of=/dev/null bs=1M count={warm_mib} iflag=direct 2>/dev/null; "
            "read t0 rest < /proc/uptime; "
            f"dd if=/dev/vda of=/dev/null bs=1M count={mib} skip={warm_mib} iflag=direct 2>/dev/null; "
            "read t1 rest < /proc/uptime; echo \"@@RATE $t0 $t1\"")


def run(argv: list[str], timeout: float) -> tuple[float, bytes]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    started = time.monotonic()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=timeout, env=env)
    console = result.stdout
    warning = kernel_warnings(console)
    if warning:
        raise SystemExit(f"rate_limit.py: kernel warning on the console: {warning}")
    match = RESULT.search(console)
    if match is None:
        tail = console[-2000:].decode(errors="replace")
        raise SystemExit(f"rate_limit.py: no result from {argv[0]} (exit {result.returncode}):\n{tail}")
    t0, t1 = float(match.group(1)), float(match.group(2))
    log(f"  run took {time.monotonic() - started:.1f} s")
    return t1 - t0, console


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="10M", help="the limit, bytes/s with K/M/G (binary) suffixes (default 10M)")
    ap.add_argument("--mib", type=int, default=40, help="MiB read in the timed dd (default 40)")
    ap.add_argument("--skip-qemu", action="store_true", help="pyvmm only")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SRC))
    from pyvmm.config import parse_rate

    rate = parse_rate(args.rate, "--rate")
    if rate <= 0 or args.mib < 1:
        ap.error("--rate and --mib must be positive")
    warm_mib = -(-rate // MIB) + 1     # more than the bucket holds: the timed read starts with it empty
    if not args.skip_qemu:
        ensure_qemu()
    from pyvmm.images import default_image
    from pyvmm.loader.linux import extract_vmlinux

    image = default_image()
    vmlinux = str(extract_vmlinux(image.kernel))
    script = guest_script(warm_mib, args.mib)
    guest = ["sh", "-c", script]
    load = os.getloadavg()
    log(f"load average before the runs: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyvmm-rate-limit-", dir="/var/tmp") as workdir:
        disk = pathlib.Path(workdir) / "disk.img"
        with open(disk, "wb") as f:           # allocated, not sparse: the host reads real blocks
            for _ in range(warm_mib + args.mib + 1):
                f.write(b"\x5a" * MIB)
        pyvmm = [sys.executable, "-c", PYVMM, "run", "--cold", "--accel", "tcg", "--memory", f"{MEMORY_MIB}M",
                 "--cpus", "1"]
        configs = [("pyvmm, no limit", None, pyvmm + ["--disk", str(disk), "--", *guest]),
                   (f"pyvmm, bps={args.rate}", rate, pyvmm + ["--disk", f"{disk},bps={args.rate}", "--", *guest])]
        if not args.skip_qemu:
            log(f"QEMU: {qemu_version()}")
            configs.append((f"QEMU, throttling.bps-total={rate}", rate, [
                QEMU, "-M", "q35", "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults",
                "-no-reboot", "-display", "none", "-serial", "stdio", "-kernel", vmlinux,
                "-initrd", str(image.initramfs), "-append", image.command_line(guest, extra=tcg_linux_args()),
                "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=writeback,throttling.bps-total={rate}",
                "-device", "virtio-blk-pci,drive=disk0"]))
        for name, limit, command in configs:
            log(f"{name} ...")
            seconds, _ = run(command, args.timeout)
            rows.append((name, limit, args.mib * MIB / seconds))
    print(f"\nguest dd of {args.mib} MiB (bs=1M, O_DIRECT) after {warm_mib} MiB to empty any burst; "
          f"limit {rate / MIB:g} MiB/s")
    print(f"{'configuration':<48} {'MiB/s':>8} {'of the limit':>13}")
    for name, limit, speed in rows:
        share = f"{speed * 100 / limit:.0f} %" if limit else "-"
        print(f"{name:<48} {speed / MIB:8.2f} {share:>13}")
    load = os.getloadavg()
    log(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
