#!/usr/bin/env python3
"""Where the guest's time goes during `iperf3 -R` (host -> guest), pyvmm vs QEMU, same run.

tools_io.py measures the rate; this script says whether the guest or the VMM holds it. The
guest (tools_io.py's: Linux + busybox initramfs + the tools disk, 1 vCPU, software CPU) boots
with `profile=4`, Linux's own sampling profiler (every timer tick records where the kernel was,
in 16-byte buckets), runs a 1 s `iperf3 -c` warm-up, clears the profile, then `iperf3 -c HOST
-R` for --seconds against a host server, and prints before and after it the cpu line of
/proc/stat, eth0's counters and the RX queue's interrupts; last /proc/profile, gzip+base64, over
the console. Per VMM the script prints:
  - iperf3 host -> guest MB/s (the host server's figure, as tools_io.py);
  - guest idle: the share of the test the guest's CPU spent idle (/proc/stat: idle jiffies over
    all jiffies of the interval), and the share of the kernel's profile ticks in the idle loop's
    HLT (native_safe_halt): a guest that waits for its packets idles;
  - frames received per second and per RX interrupt (/proc/net/dev, /proc/interrupts);
  - the kernel functions with the most profile ticks (kernel text only: user space and modules
    are not sampled by profile=; modules land in the last bucket, shown as "(modules)").
Both VMMs run the same kernel, initramfs and command line (QEMU: q35, as tools_io.py).
Runs as root on Debian 12 (namespaces, TAPs); installs qemu-system-x86 and iperf3 when missing.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import gzip
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import tools_io  # noqa: E402
from boot import SRC, ensure_qemu, kernel_warnings, log  # noqa: E402
from guest_tools import GUEST_SETUP  # noqa: E402
from net_host import HOST_IP, BenchError, _disk_image, qemu_tap_namespace  # noqa: E402

PROFILE_SHIFT = 4
IDLE_FUNCTION = "native_safe_halt"
MARK = "@@GPROF"
STATS = re.compile(rb"^" + MARK.encode() + rb" (before|after) (.*)$")


def guest_script(seconds: int) -> str:
    """The guest's script (base64 on the kernel command line: kept short)."""
    stats = ("echo \"@@GPROF $1 $(grep '^cpu ' /proc/stat) | $(grep eth0: /proc/net/dev) | "
             "$(grep input.0 /proc/interrupts)\"")
    return f"""\
f(){{ echo "@@BENCH-ERROR $*";exit 1;}}
{GUEST_SETUP}w(){{ i=$((i+1));[ $i -lt 30 ]||f $1;sleep 1;}}
p(){{ i=0;until iperf3 -c {HOST_IP} -t $1 -p $2 $3 >/tmp/e 2>&1;do w "iperf3: $(tail -n1 /tmp/e)";done;}}
s(){{ {stats};}}
p 1 {tools_io.TX_PORT};echo >/proc/profile;s before;p {seconds} {tools_io.RX_PORT} -R;s after
echo {MARK}-START;gzip -c /proc/profile|base64;echo {MARK}-END
"""


def parse_stats(line: bytes) -> dict[str, int]:
    """jiffies (all, idle), eth0's received bytes and packets, and RX interrupts from one stats line."""
    cpu, net, irq = (part.strip() for part in line.split(b"|"))
    jiffies = [int(x) for x in cpu.split()[1:]]
    rx = net.split(b":", 1)[1].split()
    irqs = irq.split()
    interrupts = sum(int(x) for x in irqs[1:] if x.isdigit()) if irqs else 0
    return {"jiffies": sum(jiffies[:8]), "idle": jiffies[3] + jiffies[4], "rx_bytes": int(rx[0]),
            "rx_packets": int(rx[1]), "rx_interrupts": interrupts}


def kernel_symbols(system_map: pathlib.Path) -> tuple[list[int], list[str], int]:
    """(sorted text addresses, their names, _stext) from a System.map."""
    pairs = []
    for line in system_map.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in "tTwW":
            pairs.append((int(fields[0], 16), fields[2]))
    pairs.sort()
    stext = next(address for address, name in pairs if name == "_stext")
    return [a for a, _ in pairs], [n for _, n in pairs], stext


def profile_by_function(raw: bytes, symbols: tuple[list[int], list[str], int]) -> dict[str, int]:
    """/proc/profile (its first word the bucket size, then a tick count per bucket from _stext;
    the last bucket takes every address past the text, modules among them) -> ticks per function."""
    counts = struct.unpack(f"<{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    step, buckets = counts[0], counts[1:]
    addresses, names, stext = symbols
    ticks: dict[str, int] = {}
    for index, count in enumerate(buckets):
        if not count:
            continue
        if index == len(buckets) - 1:
            name = "(modules)"
        else:
            found = bisect.bisect_right(addresses, stext + index * step) - 1
            name = names[found] if found >= 0 else "(before _stext)"
        ticks[name] = ticks.get(name, 0) + count
    return ticks


def run_once(vmm: str, image, vmlinux: str, tools: pathlib.Path, seconds: int, timeout: float,
             workdir: pathlib.Path) -> tuple[float, dict[str, int], dict[str, int], bytes]:
    """One boot: (host -> guest MB/s, stats before, stats after, /proc/profile)."""
    config = tools_io.Config(vmm, vmm, "pci")
    disk = workdir / f"{vmm}.img"
    _disk_image(disk, 32)
    guest = ["sh", "-c", guest_script(seconds)]
    netns, proc, servers = None, None, {}
    lines: list[bytes] = []
    try:
        if vmm == "qemu":
            netns = qemu_tap_namespace(f"pyvmm-gprof-{os.getpid()}")
            servers = tools_io.start_servers(netns, workdir, vmm)
        argv = tools_io.argv_for(config, image, vmlinux, disk, tools, guest, netns)
        if vmm == "qemu":
            where = argv.index("-append") + 1
            argv[where] += f" profile={PROFILE_SHIFT}"
        else:
            where = argv.index("--")
            argv[where:where] = ["--append", f"profile={PROFILE_SHIFT}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        reader = threading.Thread(target=lambda: lines.extend(ln.rstrip(b"\r\n") for ln in proc.stdout), daemon=True)
        reader.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        if vmm == "pyvmm":
            servers = tools_io.servers_in_pyvmm_namespace(proc, workdir, vmm, t0 + timeout)
        proc.wait()
        killer.cancel()
        reader.join(10)
        tools_io.wait_for_servers(servers)
        console = b"\n".join(lines)
        tail = f"\n--- console (end) ---\n{console[-2000:].decode(errors='replace')}"
        if warned := kernel_warnings(console):
            raise BenchError(f"{vmm}: {warned}{tail}")
        for line in lines:
            if line.startswith(b"@@BENCH-ERROR"):
                raise BenchError(f"{vmm}: in the guest: {line.decode(errors='replace')}{tail}")
        stats = {m.group(1).decode(): parse_stats(m.group(2)) for line in lines if (m := STATS.match(line))}
        start, end = f"{MARK}-START".encode(), f"{MARK}-END".encode()
        if set(stats) != {"before", "after"} or start not in lines or end not in lines:
            raise BenchError(f"{vmm}: the guest did not finish its script{tail}")
        raw = gzip.decompress(base64.b64decode(b"".join(lines[lines.index(start) + 1:lines.index(end)])))
        if "rx" not in servers:
            raise BenchError(f"{vmm}: no iperf3 server ran{tail}")
        rate, _ = tools_io.server_rate("rx", servers["rx"][1])
        return rate, stats["before"], stats["after"], raw
    finally:
        tools_io.end_run(vmm, proc, servers, netns)


def summary(rate: float, before: dict[str, int], after: dict[str, int], ticks: dict[str, int],
            seconds: int) -> dict[str, float]:
    jiffies = after["jiffies"] - before["jiffies"]
    frames = after["rx_packets"] - before["rx_packets"]
    interrupts = after["rx_interrupts"] - before["rx_interrupts"]
    total = sum(ticks.values())
    return {"MB/s host -> guest": rate,
            "guest idle, /proc/stat (%)": 100 * (after["idle"] - before["idle"]) / jiffies if jiffies else 0.0,
            f"kernel ticks in {IDLE_FUNCTION} (%)": 100 * ticks.get(IDLE_FUNCTION, 0) / total if total else 0.0,
            "frames received per second": frames / seconds,
            "bytes per frame": (after["rx_bytes"] - before["rx_bytes"]) / frames if frames else 0.0,
            "frames per RX interrupt": frames / interrupts if interrupts else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=8, metavar="S", help="seconds of iperf3 -R (default 8)")
    ap.add_argument("--top", type=int, default=15, metavar="N", help="kernel functions listed per VMM (default 15)")
    ap.add_argument("--skip-qemu", action="store_true", help="profile pyvmm only")
    ap.add_argument("--timeout", type=float, default=300, metavar="S", help="seconds allowed per boot (default 300)")
    args = ap.parse_args(argv)
    if args.seconds < 1 or args.top < 0:
        ap.error("--seconds must be at least 1 and --top not negative")
    if os.geteuid() != 0:
        sys.exit("guest_profile.py: run as root (network namespaces and TAPs)")
    if shutil.which("ip") is None:
        sys.exit("guest_profile.py: the ip command (iproute2) is missing")
    if not args.skip_qemu:
        ensure_qemu()
    tools_io.ensure_iperf3()
    image, tools, vmlinux = tools_io.guest_images("guest_profile.py")
    symbols = kernel_symbols(pathlib.Path(image.system_map))
    vmms = ["pyvmm"] + ([] if args.skip_qemu else ["qemu"])
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="pyvmm-guest-profile-", dir="/var/tmp"))
    results: dict[str, tuple[dict[str, float], dict[str, int]]] = {}
    try:
        for vmm in vmms:
            log(f"{vmm}: iperf3 -R for {args.seconds} s with profile={PROFILE_SHIFT}")
            rate, before, after, raw = run_once(vmm, image, vmlinux, tools, args.seconds, args.timeout, workdir)
            ticks = profile_by_function(raw, symbols)
            results[vmm] = (summary(rate, before, after, ticks, args.seconds), ticks)
    except BenchError as exc:
        print(f"guest_profile.py: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"guest during iperf3 -R ({args.seconds} s): Linux {image.kernel_version}, 256 MiB, 1 vCPU, software CPU")
    print(f"{'':40}" + "".join(f"{vmm:>12}" for vmm in vmms))
    for key in results[vmms[0]][0]:
        print(f"{key:40}" + "".join(f"{results[vmm][0][key]:12.1f}" for vmm in vmms))
    for vmm in vmms:
        ticks = results[vmm][1]
        total = sum(ticks.values()) or 1
        print(f"\n{vmm}: kernel functions by profile ticks ({total} ticks in kernel text)")
        for name, count in sorted(ticks.items(), key=lambda item: -item[1])[:args.top]:
            print(f"  {100 * count / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
