#!/usr/bin/env python3
"""What a KiB of guest TCP costs in guest events: pyvmm and QEMU, same guest, same run.

Wall-clock rates on a loaded host say little; the events the guest handles per KiB do not
depend on the load (they depend on the regime the guest's TCP settles in). Each configuration
boots the default guest (`pyvmm image build`: stock kernel, busybox initramfs) on a software
CPU with one virtio-net NIC on a TAP in a fresh network namespace, then

  TCP tx   dd if=/dev/zero bs=64k | nc 10.0.2.1 5001   (busybox nc writes 1 KiB per write)
  TCP rx   nc 10.0.2.1 5002 | wc -c                      (the host sends N MiB)

and reads, before and after each transfer, inside the guest: eth0's packet counters (one
packet = one TAP write or read), the virtio-net input/output interrupt counts, the TCP
counters (ACKs received, autocorked writes) and /proc/stat (guest CPU idle); on the host,
every 20 ms, the VMM process's CPU time and its threads' context switches (/proc/PID/task),
taken over each transfer (accept to EOF at the host's socket). Printed per KiB moved, with
the MB/s the host measured for reference (and the load average).

  pyvmm   pyvmm run --accel tcg --net tap=auto,transport=pci (pyvmm makes the namespace)
  QEMU    -M q35 -accel tcg, -netdev tap on a TAP this script makes, -device virtio-net-pci

Run as root on Debian 12 (network namespaces, TAPs); QEMU is installed when missing.
"""

from __future__ import annotations

import argparse
import bisect
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from boot import EXIT_LINE, MEMORY_MIB, QEMU, SRC, ensure_qemu, kernel_warnings, log, qemu_version, tcg_linux_args  # noqa: E402,E501
from net_host import (GUEST_IP, HOST_IP, IP_TOKEN, MAC, RX_PORT, TX_PORT, BenchError, close_peers, ip,  # noqa: E402
                       list_netns, open_peers, qemu_tap_namespace, running)

COUNTS = re.compile(rb"^@@C (\d) (.*)$")
TCP_EXT = re.compile(rb"^@@N (\d) TcpExt: (.*)$")
RESULT = re.compile(rb"^@@R (\d+)$")
# eth0 packets (rx, tx: the glob's order), virtio input/output interrupts, the /proc/stat cpu line
STATS = "/sys/class/net/eth0/statistics"


def guest_script(mib: int) -> str:
    """Kept short: it travels base64-encoded on the kernel command line."""
    h = HOST_IP
    return f"""\
c(){{ echo "@@C $1 $(cat {STATS}/[rt]x_packets|tr '\\n' ' ')$(grep 'put\\.0' /proc/interrupts|awk '{{printf $2" "}}')$(head -1 /proc/stat)";grep ^TcpExt /proc/net/netstat|sed "s/^/@@N $1 /";}}
i=0;until ping -c1 -W1 {h} >/dev/null;do i=$((i+1));[ $i -lt 30 ]||exit 1;sleep 1;done
c 0
dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null|nc {h} {TX_PORT}||exit 1
c 1
mkfifo /tmp/p;g=$(nc {h} {RX_PORT} <>/tmp/p|wc -c)
c 2
echo "@@R $g"
"""


def parse(console: bytes) -> tuple[dict[int, dict[str, int]], int]:
    """Per checkpoint: rx/tx packets, input/output interrupts, cpu busy/idle ticks, TcpExt counters."""
    points: dict[int, dict[str, int]] = {}
    names: dict[int, list[str]] = {}
    received = -1
    for line in console.splitlines():
        line = line.rstrip(b"\r")
        if m := COUNTS.match(line):
            f = m.group(2).split()
            cpu = [int(x) for x in f[5:]]  # after "cpu": user nice system idle iowait irq softirq ...
            points[int(m.group(1))] = {"rx_packets": int(f[0]), "tx_packets": int(f[1]), "irq_in": int(f[2]),
                                       "irq_out": int(f[3]), "idle": cpu[3] + cpu[4], "ticks": sum(cpu[:8])}
        elif m := TCP_EXT.match(line):
            point, fields = int(m.group(1)), m.group(2).decode().split()
            if point not in names:
                names[point] = fields
            else:
                points.setdefault(point, {}).update(zip(names[point], map(int, fields)))
        elif m := RESULT.match(line):
            received = int(m.group(1))
    return points, received


class VmmSampler(threading.Thread):
    """Every 20 ms: the VMM process's CPU seconds and voluntary/involuntary context switches,
    summed over its threads; and when each TCP peer finished (its `seconds` appears)."""

    def __init__(self, pid: int, peers) -> None:
        super().__init__(daemon=True, name="net_counts-sampler")
        self.pid, self.peers = pid, peers
        self.samples: list[tuple[float, float, int, int]] = []
        self.finished: dict[int, float] = {}  # peer index -> host time its transfer ended
        self.done = threading.Event()

    def totals(self) -> tuple[float, int, int] | None:
        cpu, switches = 0, [0, 0]
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return None
        for tid in tasks:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            switches[0] += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            switches[1] += int(line.split()[1])
            except OSError:  # a thread that ended meanwhile
                continue
            cpu += int(fields[11]) + int(fields[12])
        return cpu / os.sysconf("SC_CLK_TCK"), switches[0], switches[1]

    def run(self) -> None:
        while not self.done.wait(0.02):
            now = time.monotonic()
            for index, peer in enumerate(self.peers):
                if index not in self.finished and peer.seconds is not None:
                    self.finished[index] = now
            if (totals := self.totals()) is not None:
                self.samples.append((now, *totals))

    def between(self, index: int) -> tuple[float, int, int] | None:
        """CPU seconds and context switches over peer `index`'s transfer."""
        end, peer = self.finished.get(index), self.peers[index]
        if end is None or peer.seconds is None or len(self.samples) < 2:
            return None
        times = [sample[0] for sample in self.samples]
        first = self.samples[max(bisect.bisect_left(times, end - peer.seconds) - 1, 0)]
        last = self.samples[min(bisect.bisect_left(times, end), len(times) - 1)]
        return last[1] - first[1], last[2] - first[2], last[3] - first[3]


def argv_for(vmm: str, image, vmlinux: str, script: str, netns: str | None) -> list[str]:
    guest = ["sh", "-c", script]
    if vmm == "pyvmm":
        return [sys.executable, "-m", "pyvmm.cli", "run", "--accel", "tcg", "--memory", f"{MEMORY_MIB}M", "--cpus", "1",
                "--net", f"tap=auto,mac={MAC},transport=pci", "--", *guest]
    assert netns is not None
    return ["ip", "netns", "exec", netns, QEMU, "-M", "q35", "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", "1",
            "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio", "-kernel", vmlinux,
            "-initrd", str(image.initramfs), "-append",
            image.command_line(guest, extra=f"{tcg_linux_args()} {IP_TOKEN}"),
            "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={MAC}"]


def run_once(vmm: str, image, vmlinux: str, mib: int, timeout: float) -> dict:
    nbytes = mib << 20
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    netns, peers, proc = None, (), None
    lines: list[bytes] = []
    try:
        if vmm == "qemu":
            netns = qemu_tap_namespace(f"pyvmm-netcounts-{os.getpid()}")
            peers = open_peers(netns, nbytes, timeout)
        proc = subprocess.Popen(argv_for(vmm, image, vmlinux, guest_script(mib), netns), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True)
        reader.start()
        t0 = time.monotonic()
        while vmm == "pyvmm" and not peers and running(proc.pid) and time.monotonic() - t0 < timeout:
            found = [n for n in list_netns() if n.startswith(f"pyvmm-{proc.pid}-")]
            if found:
                peers = open_peers(found[0], nbytes, timeout)
            else:
                time.sleep(0.05)
        sampler = VmmSampler(proc.pid, peers)
        sampler.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{vmm}: no power-off within {timeout:g} s") from None
        reader.join(10)
        sampler.done.set()
        sampler.join(10)
        console = b"".join(lines)
        tail = f"\n--- console (end) ---\n{console[-2000:].decode(errors='replace')}"
        status = EXIT_LINE.search(console)
        if warned := kernel_warnings(console):
            raise BenchError(f"{vmm}: {warned}{tail}")
        if status is None or status.group(1) != b"0":
            raise BenchError(f"{vmm}: the guest script failed{tail}")
        points, received = parse(console)
        if sorted(points) != [0, 1, 2] or received != nbytes:
            raise BenchError(f"{vmm}: counters at {sorted(points)}, {received} bytes received of {nbytes}{tail}")
        if len(peers) != 2:
            raise BenchError(f"{vmm}: no network namespace pyvmm-{proc.pid}-* appeared{tail}")
        close_peers(peers)
        for p in peers:
            p.join(10)
        rates = {}
        for peer, key in zip(peers, ("tx", "rx")):
            if peer.error or peer.seconds is None or peer.bytes != nbytes:
                raise BenchError(f"{vmm}: TCP {key}: {peer.error or f'{peer.bytes} bytes of {nbytes}'}")
            rates[key] = nbytes / peer.seconds / 1e6
        host = {key: sampler.between(index) for index, key in enumerate(("tx", "rx"))}
        return {"points": points, "rates": rates, "host": host}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        close_peers(peers)
        if netns is not None:
            ip("-n", netns, "link", "del", "tap0", check=False)
            ip("netns", "del", netns, check=False)


def per_kib(run: dict, mib: int) -> dict[str, dict[str, float]]:
    p = run["points"]
    kib = mib * 1024
    out = {}
    for key, a, b, sent, got in (("tx", 0, 1, "tx_packets", "rx_packets"), ("rx", 1, 2, "rx_packets", "tx_packets")):
        d = {name: p[b].get(name, 0) - p[a].get(name, 0) for name in p[b]}
        acks = d.get("TCPHPAcks", 0) + d.get("TCPPureAcks", 0)
        out[key] = {"data packets": d[sent] / kib, "bytes per data packet": kib * 1024 / max(d[sent], 1),
                    "packets the other way": d[got] / kib, "TCP ACKs received": acks / kib if key == "tx" else None,
                    "writes autocorked": d.get("TCPAutoCorking", 0) / kib if key == "tx" else None,
                    "interrupts (input + output)": (d["irq_in"] + d["irq_out"]) / kib,
                    "guest CPU idle %": 100 * d["idle"] / max(d["ticks"], 1)}
        host = run["host"][key]
        if host is not None:
            out[key].update({"VMM CPU ms": 1000 * host[0] / kib, "VMM context switches": (host[1] + host[2]) / kib,
                             "  of them involuntary": host[2] / kib})
        out[key]["MB/s (host clock)"] = run["rates"][key]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=8, help="MiB each way (default 8)")
    ap.add_argument("--skip-qemu", action="store_true", help="measure pyvmm only")
    ap.add_argument("--timeout", type=float, default=900, metavar="S", help="seconds allowed per run (default 900)")
    args = ap.parse_args(argv)
    if args.mib < 1:
        ap.error("--mib must be at least 1")
    if os.geteuid() != 0:
        sys.exit("net_counts.py: run as root (network namespaces and TAPs)")
    if not args.skip_qemu:
        ensure_qemu()
    from pyvmm.images import default_image
    from pyvmm.loader.linux import extract_vmlinux

    image = default_image()
    vmlinux = str(extract_vmlinux(image.kernel))
    load = os.getloadavg()
    log(f"load average before the runs: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    results = {}
    try:
        for vmm in ("pyvmm",) + (() if args.skip_qemu else ("qemu",)):
            log(f"run: {vmm}")
            results[vmm] = per_kib(run_once(vmm, image, vmlinux, args.mib, args.timeout), args.mib)
    except BenchError as exc:
        print(f"net_counts.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("net_counts.py: interrupted; cleaned up", file=sys.stderr)
        return 130
    load_after = os.getloadavg()
    print(f"Guest events per KiB of busybox-nc TCP ({args.mib} MiB each way), guest {GUEST_IP} <-> host {HOST_IP}; "
          f"load average {load[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    if not args.skip_qemu:
        print(f"QEMU: {qemu_version()}")
    names = list(results)
    for key, title in (("tx", "TCP guest -> host"), ("rx", "TCP host -> guest")):
        print(f"\n{title:34s}" + "".join(f"{name:>12s}" for name in names))
        for metric in results[names[0]][key]:
            values = [results[name][key].get(metric) for name in names]
            if all(v is None for v in values):
                continue
            print(f"  {metric:32s}" + "".join(f"{'n/a':>12s}" if v is None else f"{v:12.2f}" if v < 100 else f"{v:12.0f}"
                                              for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
