#!/usr/bin/env python3
"""Virtio block and network throughput: pyvmm (virtio-pci and virtio-mmio) vs QEMU, same guest, same run.

Every configuration boots pyvmm's default Debian guest (`pyvmm image build`: the stock
kernel and pyvmm's busybox initramfs) with the same kernel command line, 256 MiB of RAM,
one vCPU and a software CPU (pyvmm `--accel tcg`: Unicorn; QEMU `-accel tcg`), with one
virtio disk on a raw image file and one virtio NIC on a TAP in its own network namespace
(host 10.0.2.1/24, guest 10.0.2.15/24):

  pyvmm pci    pyvmm run --accel tcg --disk IMG,transport=pci --net tap=auto,mac=...,transport=pci
               (pyvmm creates the namespace and TAP; its CLI runs through a small hook, below)
  pyvmm mmio   the same with transport=mmio
  QEMU         q35 with the vmlinux pyvmm extracts from the bzImage (PVH boot),
               -drive file=IMG,format=raw,cache=writeback -device virtio-blk-pci and
               -netdev tap (a TAP this script creates in a fresh namespace) -device
               virtio-net-pci; the kernel command line carries the `pyvmm.ip=` token and
               `tsc=nowatchdog` pyvmm adds, so the guest's /init configures eth0 the same way.
QEMU uses cache=writeback (the host page cache, guest flushes -> fdatasync): that is what
pyvmm's virtio-blk does, so both see the same host storage path.

Disk figures come from busybox dd on /dev/vda and network figures from busybox nc (the
same devices under fio and iperf3: tools_io.py):
  seq write   dd if=/dev/zero of=/dev/vda bs=1M count=N conv=fsync
  seq read    sync; echo 3 > drop_caches; dd if=/dev/vda of=/dev/null bs=1M count=N
  4k write    dd ... bs=4k oflag=direct conv=fsync   (one 4 KiB request at a time)
  4k read     dd ... bs=4k iflag=direct
  TCP tx      guest -> host: dd if=/dev/zero bs=64k | nc 10.0.2.1 5001; a receiver
              socket this script opens in the namespace counts the bytes and times them
              (accept -> EOF)
  TCP rx      host -> guest: the same receiver-side socket sends N bytes to
              `nc 10.0.2.1 5002 | wc -c` and times accept -> the guest closing the
              connection (busybox nc closes when it has read the host's EOF; its stdin is
              a FIFO nobody writes, so it does not half-close earlier)
Disk intervals are timed on the host. Before and after each dd the guest writes a marker
byte to I/O port 0x610 (`pyvmm-outb`, a tiny static binary in the initramfs); pyvmm's
port-0x610 device (GuestNotify, hooked in the pyvmm child as boot.py does) and QEMU's
isa-debugcon at 0x610 pass each byte to a pipe, and this script timestamps it. The median
of a few empty marker intervals (the cost of running pyvmm-outb itself, ~25 ms under
pyvmm) is subtracted from every interval. Not the alternatives: busybox dd prints no timing;
a host clock does not depend on guest timekeeping; console lines reached the host in bursts
under pyvmm during virtio I/O. A kernel warning on the console fails the run. MB/s = 10^6 B/s.

Both VMMs run the guest's code on a software CPU, so these numbers measure the whole
stack -- guest kernel and busybox emulated instruction by instruction, virtio rings, the
VMM's device model and the host's files and TAP -- and guest CPU emulation dominates.

Runs on Debian 12 with Python 3.11 as root (network namespaces, TAPs); installs
qemu-system-x86 with apt-get when it is missing, and builds the guest image on first use.
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
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
# boot.py puts this repo's src/ on sys.path and has the shared helpers
from boot import EXIT_LINE, MEMORY_MIB, QEMU, SRC, busy_cpu_seconds, ensure_qemu, kernel_warnings, log, qemu_version, tcg_linux_args  # noqa: E402,E501

# the host end of the network tests and the scratch disk, shared with tools_io.py and net_counts.py
from net_host import (HOST_IP, IP_TOKEN, MAC, RX_PORT, TX_PORT, BenchError, _disk_image, qemu_tap_namespace,  # noqa: E402
                      close_peers, kill_group, list_netns, open_peers, remove_namespace, running)
INFO = re.compile(rb"^@@BENCH (\S+)(?: (.*))?$")
ERROR = re.compile(rb"^@@BENCH-ERROR (.*)$")
MB = 1e6
MARK_PORT = 0x610   # pyvmm's GuestNotify port; the guest's /init writes 0x01 there once ("init started")
MARK_BASE = 0x10    # marker codes: MARK_BASE/+1 bracket an empty interval, then one pair per disk test
NULL_PAIRS = 3      # empty intervals: the cost of the markers themselves, subtracted from each test

# Run in the pyvmm child: the unmodified CLI, with the 0x610 device also forwarding every byte the
# guest writes there to the inherited fd PYVMM_BENCH_MARK_FD (a pipe this script timestamps).
PYVMM_HOOK = """\
import os, sys
import pyvmm.builder as builder
from pyvmm.devices.legacy import GuestNotify
fd = int(os.environ.pop("PYVMM_BENCH_MARK_FD"))
class MarkGuestNotify(GuestNotify):
    def write(self, offset, data):
        if offset == 0 and data:
            os.write(fd, bytes(data))
        super().write(offset, data)
if builder.GuestNotify is not GuestNotify:
    sys.exit("virtio_io.py: pyvmm.builder no longer uses GuestNotify; update benchmarks/virtio_io.py")
builder.GuestNotify = MarkGuestNotify
from pyvmm.cli import main
sys.argv[0] = "pyvmm"
sys.exit(main(sys.argv[1:]))
"""

DISK_TESTS = ("seqwrite", "seqread", "write4k", "read4k")
LABELS = {
    "seqwrite": "seq write bs=1M, fsync",
    "seqread": "seq read bs=1M",
    "write4k": "write bs=4k O_DIRECT, fsync",
    "read4k": "read bs=4k O_DIRECT",
    "tx": "TCP guest -> host",
    "rx": "TCP host -> guest",
}
# virtio-net feature bits worth showing (virtio 1.2 section 5.1.3)
NET_FEATURES = {0: "CSUM", 1: "GUEST_CSUM", 7: "GUEST_TSO4", 11: "HOST_TSO4", 15: "MRG_RXBUF"}


@dataclasses.dataclass
class Sizes:
    seq_mib: int
    small_mib: int
    net_mib: int

    @property
    def disk_mib(self) -> int:
        return max(self.seq_mib, self.small_mib) + 1


# --- the guest's command ---------------------------------------------------------------


def guest_script(sizes: Sizes) -> str:
    """The guest's shell script, kept short: it travels base64-encoded on the kernel command line.

    `m CODE` writes CODE to I/O port 0x610 (through the initramfs's /bin/pyvmm-outb); the
    host timestamps each byte. `r NAME CODE dd ...` brackets one dd with CODE and CODE+1.
    """
    n4k, chunks = sizes.small_mib * 256, sizes.net_mib * 16  # 4 KiB requests, 64 KiB blocks
    h = HOST_IP
    null = " ".join(f"m {MARK_BASE};m {MARK_BASE + 1};" for _ in range(NULL_PAIRS))
    c = {test: MARK_BASE + 2 * (i + 1) for i, test in enumerate(DISK_TESTS)}
    return f"""\
f(){{ echo "@@BENCH-ERROR $*";exit 1;}}
m(){{ pyvmm-outb {MARK_PORT} $1||f no port write;}}
[ -b /dev/vda ]||f no /dev/vda
[ -e /sys/class/net/eth0 ]||f no eth0
echo "@@BENCH net-features $(cat /sys/class/net/eth0/device/features)"
r(){{ n=$1;c=$2;shift 2;m $c;"$@" 2>/tmp/e||f $n: $(tail -n1 /tmp/e);m $((c+1));}}
{null}
r seqwrite {c["seqwrite"]} dd if=/dev/zero of=/dev/vda bs=1M count={sizes.seq_mib} conv=fsync
sync;echo 3 >/proc/sys/vm/drop_caches
r seqread {c["seqread"]} dd if=/dev/vda of=/dev/null bs=1M count={sizes.seq_mib}
r write4k {c["write4k"]} dd if=/dev/zero of=/dev/vda bs=4k count={n4k} oflag=direct conv=fsync
r read4k {c["read4k"]} dd if=/dev/vda of=/dev/null bs=4k count={n4k} iflag=direct
w(){{ i=$((i+1));[ $i -lt 30 ]||f $1;sleep 1;}}
i=0;until ping -c1 -W1 {h} >/dev/null;do w no ping;done
i=0;until dd if=/dev/zero bs=64k count={chunks} 2>/dev/null|nc {h} {TX_PORT};do w nc tx;done
mkfifo /tmp/p
i=0;until g=$(nc {h} {RX_PORT} <>/tmp/p|wc -c)&&[ $g -gt 0 ];do w nc rx;done
echo "@@BENCH rx-bytes $g"
"""


# --- configurations and one run --------------------------------------------------------


@dataclasses.dataclass
class Config:
    name: str
    vmm: str          # "pyvmm" | "qemu"
    transport: str    # pyvmm: "pci" | "mmio"


@dataclasses.dataclass
class Run:
    rates: dict[str, float]   # test -> MB/s
    wall: float               # spawn -> exit
    cpu_s: float              # VMM process user + system CPU
    features: str             # virtio-net features the guest driver negotiated
    overhead: float           # seconds of an empty marker interval (subtracted)
    raw: dict[str, float]     # disk test -> seconds between its markers, before the subtraction


def argv_for(config: Config, image, vmlinux: str, disk: pathlib.Path, guest: list[str],
             netns: str | None, mark_fd: int) -> list[str]:
    if config.vmm == "pyvmm":
        t = config.transport
        return [sys.executable, "-c", PYVMM_HOOK, "run", "--accel", "tcg", "--memory", f"{MEMORY_MIB}M",
                "--cpus", "1", "--disk", f"{disk},transport={t}", "--net", f"tap=auto,mac={MAC},transport={t}",
                "--", *guest]
    return ["ip", "netns", "exec", netns,
            QEMU, "-M", "q35", "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", "1",
            "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
            "-kernel", vmlinux, "-initrd", str(image.initramfs), "-append", image.command_line(guest, extra=f"{tcg_linux_args()} {IP_TOKEN}"),
            "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=writeback",
            "-device", "virtio-blk-pci,drive=disk0",
            "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={MAC}",
            "-chardev", f"file,id=marks,path=/dev/fd/{mark_fd}",
            "-device", f"isa-debugcon,iobase={MARK_PORT:#x},chardev=marks"]


def shown_argv(argv: list[str]) -> str:
    out = []
    for a in argv:
        if a.startswith("console=") and "pyvmm.cmd=" in a:
            a = re.sub(r"pyvmm\.cmd=\S+", "pyvmm.cmd=<script>", a)
        elif a.startswith("file,id=marks,"):
            a = "file,id=marks,path=/dev/fd/N"
        elif a == PYVMM_HOOK:
            a = "<hook>"
        out.append(a)
    if "--" in out:
        out = out[:out.index("--")] + ["--", "sh", "-c", "<script>"]
    return shlex.join(out)


def run_once(config: Config, image, vmlinux: str, disk: pathlib.Path, sizes: Sizes, timeout: float,
             run_tag: str) -> Run:
    guest = ["sh", "-c", guest_script(sizes)]
    nbytes = sizes.net_mib << 20
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    netns = None
    peers: tuple = ()
    proc = None
    lines: list[tuple[float, bytes]] = []
    events: list[tuple[float, int]] = []   # (host time, byte the guest wrote to port 0x610)
    stderr: list[bytes] = []
    mark_r, mark_w = os.pipe()
    try:
        if config.vmm == "qemu":
            netns = qemu_tap_namespace(f"pyvmm-bench-{os.getpid()}-{run_tag}")
            peers = open_peers(netns, nbytes, timeout)
        argv = argv_for(config, image, vmlinux, disk, guest, netns, mark_w)
        env["PYVMM_BENCH_MARK_FD"] = str(mark_w)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True, pass_fds=(mark_w,))
        os.close(mark_w)
        mark_w = -1

        def read_marks() -> None:
            while chunk := os.read(mark_r, 256):
                t = time.monotonic()
                events.extend((t, b) for b in chunk)

        def read_stdout() -> None:
            for line in iter(proc.stdout.readline, b""):
                lines.append((time.monotonic(), line.rstrip(b"\r\n")))

        def read_stderr() -> None:
            stderr.append(proc.stderr.read())

        readers = [threading.Thread(target=fn, daemon=True) for fn in (read_stdout, read_stderr, read_marks)]
        for t in readers:
            t.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        if config.vmm == "pyvmm":  # pyvmm makes its namespace pyvmm-<pid>-<n> while it builds the VM
            prefix = f"pyvmm-{proc.pid}-"
            while not peers and running(proc.pid) and time.monotonic() - t0 < timeout:
                found = [n for n in list_netns() if n.startswith(prefix)]
                if found:
                    netns = found[0]
                    peers = open_peers(netns, nbytes, timeout)
                else:
                    time.sleep(0.05)
        if not peers and running(proc.pid):
            proc.kill()
        _, wait_status, rusage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
        for t in readers:
            t.join(10)
        close_peers(peers)
        for p in peers:
            p.join(10)

        console = b"\n".join(line for _, line in lines)
        tail = (f"\n--- console (end) ---\n{console[-3000:].decode(errors='replace')}"
                f"\n--- stderr (end) ---\n{b''.join(stderr)[-2000:].decode(errors='replace')}")
        for _, line in lines:
            if m := ERROR.match(line):
                raise BenchError(f"{config.name}: in the guest: {m.group(1).decode(errors='replace')}{tail}")
        if warned := kernel_warnings(console):
            raise BenchError(f"{config.name}: {warned}{tail}")
        if wall >= timeout:
            raise BenchError(f"{config.name}: no power-off within --timeout {timeout:g} s{tail}")
        status = EXIT_LINE.search(console)
        if status is None:
            raise BenchError(f"{config.name}: the guest did not finish its script (VMM exit status "
                             f"{proc.returncode}){tail}")
        expected = int(status.group(1)) if config.vmm == "pyvmm" else 0
        if status.group(1) != b"0" or proc.returncode != expected:
            raise BenchError(f"{config.name}: guest script exit status {status.group(1).decode()}, VMM exit status "
                             f"{proc.returncode}{tail}")

        info: dict[str, bytes] = {}
        for _, line in lines:
            if m := INFO.match(line):
                info.setdefault(m.group(1).decode(), (m.group(2) or b"").strip())
        at: dict[int, list[float]] = {}
        for t, code in events:
            at.setdefault(code, []).append(t)
        starts, ends = at.get(MARK_BASE, []), at.get(MARK_BASE + 1, [])
        if len(starts) != NULL_PAIRS or len(ends) != NULL_PAIRS:
            raise BenchError(f"{config.name}: {len(starts) + len(ends)} of the {2 * NULL_PAIRS} empty-interval port "
                             f"{MARK_PORT:#x} writes reached the host{tail}")
        overhead = statistics.median(e - s for s, e in zip(starts, ends))
        rates, raw = {}, {}
        for i, test in enumerate(DISK_TESTS):
            code = MARK_BASE + 2 * (i + 1)
            if len(at.get(code, [])) != 1 or len(at.get(code + 1, [])) != 1:
                raise BenchError(f"{config.name}: {test}: the port {MARK_PORT:#x} writes around it did not reach "
                                 f"the host{tail}")
            raw[test] = at[code + 1][0] - at[code][0]
            mib = sizes.seq_mib if test.startswith("seq") else sizes.small_mib
            rates[test] = (mib << 20) / max(raw[test] - overhead, 1e-6) / MB
        if not peers:
            raise BenchError(f"{config.name}: no network namespace pyvmm-{proc.pid}-* appeared (VMM exit status "
                             f"{proc.returncode}){tail}")
        tx, rx = peers
        for peer, key in ((tx, "tx"), (rx, "rx")):
            if peer.error or peer.seconds is None:
                raise BenchError(f"{config.name}: {LABELS[key]}: {peer.error or 'not finished'}{tail}")
            if peer.bytes != nbytes:
                raise BenchError(f"{config.name}: {LABELS[key]}: {peer.bytes} bytes moved, expected {nbytes}")
            rates[key] = nbytes / peer.seconds / MB
        guest_rx = info.get("rx-bytes", b"")
        if guest_rx != str(nbytes).encode():
            raise BenchError(f"{config.name}: the guest counted {guest_rx.decode() or 'no'} bytes received, "
                             f"expected {nbytes}")
        features = info.get("net-features", b"").decode()
        return Run(rates, wall, rusage.ru_utime + rusage.ru_stime, features, overhead, raw)
    finally:
        if mark_w >= 0:
            os.close(mark_w)
        os.close(mark_r)  # after the reader thread saw EOF, or a run that is failing anyway
        kill_group(proc)
        close_peers(peers)
        remove_namespace(config.vmm, proc, netns)


def describe_features(bits: str) -> str:
    if not bits:
        return "?"
    on = [name for bit, name in NET_FEATURES.items() if bit < len(bits) and bits[bit] == "1"]
    return " ".join(on) or "none of " + " ".join(NET_FEATURES.values())


# --- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller transfers (16 MiB sequential, 1 MiB of 4k requests, 8 MiB each way on TCP) "
                         "and one repetition")
    ap.add_argument("--repeat", "-r", type=int, metavar="N", help="runs per configuration (median; default 3, "
                                                                   "1 with --quick)")
    ap.add_argument("--seq-mib", type=int, metavar="MIB", help="MiB per bs=1M dd (default 64, --quick 16)")
    ap.add_argument("--small-mib", type=int, metavar="MIB", help="MiB per bs=4k dd (default 8, --quick 1)")
    ap.add_argument("--net-mib", type=int, metavar="MIB", help="MiB per TCP direction (default 32, --quick 8)")
    ap.add_argument("--skip-qemu", action="store_true", help="measure pyvmm only")
    ap.add_argument("--skip-mmio", action="store_true", help="no pyvmm virtio-mmio row")
    ap.add_argument("--timeout", type=float, default=900, metavar="S", help="seconds allowed per run (default 900)")
    ap.add_argument("--workdir", metavar="DIR", default="/var/tmp",
                    help="where the raw disk images go (default /var/tmp; removed at the end)")
    args = ap.parse_args(argv)
    sizes = Sizes(args.seq_mib or (16 if args.quick else 64), args.small_mib or (1 if args.quick else 8),
                  args.net_mib or (8 if args.quick else 32))
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1 or min(sizes.seq_mib, sizes.small_mib, sizes.net_mib) < 1:
        ap.error("--repeat and the sizes must be at least 1")
    if os.geteuid() != 0:
        sys.exit("virtio_io.py: run as root (network namespaces and TAPs)")
    if shutil.which("ip") is None:
        sys.exit("virtio_io.py: the ip command (iproute2) is missing")

    # SIGTERM/SIGHUP end the run like Ctrl-C: the finally blocks remove namespaces, TAPs, processes, images
    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    if not args.skip_qemu:
        ensure_qemu()
    from pyvmm.images import default_image
    from pyvmm.loader.linux import extract_vmlinux

    image = default_image()
    vmlinux = str(extract_vmlinux(image.kernel))

    configs = [Config("pyvmm pci", "pyvmm", "pci")]
    if not args.skip_mmio:
        configs.append(Config("pyvmm mmio", "pyvmm", "mmio"))
    if not args.skip_qemu:
        configs.append(Config("QEMU", "qemu", "pci"))

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="pyvmm-virtio-io-", dir=args.workdir))
    runs: dict[str, list[Run]] = {c.name: [] for c in configs}
    shown: dict[str, str] = {}
    try:
        disks = {}
        for c in configs:
            disks[c.name] = workdir / f"{c.name.replace(' ', '-')}.img"
            _disk_image(disks[c.name], sizes.disk_mib)
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(workdir)], capture_output=True, text=True).stdout.strip()

        load = os.getloadavg()
        log(f"load average before the runs: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
        busy0, wall0, self0 = busy_cpu_seconds(), time.monotonic(), time.process_time()
        vmm_cpu = 0.0
        for r in range(repeat):
            for c in configs:  # interleaved: drifting host load hits every configuration alike
                log(f"run {r + 1}/{repeat}: {c.name}")
                shown[c.name] = shown_argv(argv_for(c, image, vmlinux, disks[c.name], ["sh", "-c", "x"],
                                                    "NETNS", 0))
                run = run_once(c, image, vmlinux, disks[c.name], sizes, args.timeout, f"r{r}")
                runs[c.name].append(run)
                vmm_cpu += run.cpu_s
                log("  " + ", ".join(f"{k} {v:.2f}" for k, v in run.rates.items()) + f" MB/s; {run.wall:.1f} s")
        wall = time.monotonic() - wall0
        others = (busy_cpu_seconds() - busy0 - vmm_cpu - (time.process_time() - self0)) / wall
        load_after = os.getloadavg()
    except BenchError as exc:
        print(f"virtio_io.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"virtio_io.py: interrupted ({exc or 'Ctrl-C'}); cleaned up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def med(name: str, test: str) -> float:
        return statistics.median(run.rates[test] for run in runs[name])

    print(f"Virtio block and network throughput: median of {repeat} run(s) per configuration, configurations "
          f"interleaved")
    print(f"guest: Linux {image.kernel_version} + busybox initramfs, {MEMORY_MIB} MiB, 1 vCPU, software CPU "
          f"(pyvmm --accel tcg: Unicorn; QEMU -accel tcg)")
    print(f"host: {os.cpu_count()} CPUs, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          f"{load_after[0]:.2f}; during the {wall:.0f} s of runs other processes kept {max(others, 0):.2f} CPUs "
          f"busy on average")
    if not args.skip_qemu:
        print(f"QEMU: {qemu_version()}")
    print(f"disk: raw image of {sizes.disk_mib} MiB (all blocks allocated) on {args.workdir} ({fs}), one per "
          f"configuration; QEMU cache=writeback")
    print()
    names = [c.name for c in configs]
    qemu = "QEMU" if "QEMU" in names else None
    ratio_of = [n for n in names if n != "QEMU"] if qemu else []
    head = f"{'metric (MB/s)':<34}" + "".join(f"{n:>12}" for n in names) + \
        "".join(f"{n.split()[-1] + '/QEMU':>11}" for n in ratio_of)
    print(head)
    print("-" * len(head))
    sizes_of = {"seqwrite": sizes.seq_mib, "seqread": sizes.seq_mib, "write4k": sizes.small_mib,
                "read4k": sizes.small_mib, "tx": sizes.net_mib, "rx": sizes.net_mib}
    for test in (*DISK_TESTS, "tx", "rx"):
        label = f"{LABELS[test]} ({sizes_of[test]} MiB)"
        line = f"{label:<34}" + "".join(f"{med(n, test):>12.2f}" for n in names)
        line += "".join(f"{med(n, test) / med(qemu, test):>10.3f}x" for n in ratio_of)
        print(line)
    for test in ("write4k", "read4k"):
        label = f"  {LABELS[test].split()[0]} bs=4k (IOPS)"
        print(f"{label:<34}" + "".join(f"{med(n, test) * MB / 4096:>12.0f}" for n in names))
    print()
    print("Both VMMs run the guest's code on a software CPU (pyvmm: Unicorn, QEMU: TCG), so these figures measure")
    print("the whole stack -- the emulated guest kernel and busybox, virtio rings, the VMM's device model, the host")
    print("page cache and TAP -- and guest CPU emulation dominates. They are not the device models' raw throughput.")
    print("The disk figures come from busybox dd on /dev/vda and the network figures from busybox nc (small reads")
    print("and writes); tools_io.py measures the same devices with fio and iperf3.")
    print()
    print("per run: MB/s " + " ".join(f"{t}" for t in (*DISK_TESTS, "tx", "rx")) + "; seconds between the disk "
          "markers; empty marker interval (subtracted); whole run; VMM CPU:")
    for n in names:
        for i, run in enumerate(runs[n]):
            vals = " ".join(f"{run.rates[t]:.2f}" for t in (*DISK_TESTS, "tx", "rx"))
            secs = " ".join(f"{run.raw[t]:.3f}" for t in DISK_TESTS)
            print(f"  {n} #{i + 1}: {vals}; {secs} s; {run.overhead * 1000:.1f} ms; {run.wall:.1f} s; "
                  f"{run.cpu_s:.1f} s")
    print("virtio-net features the guest negotiated (of " + " ".join(NET_FEATURES.values()) + "):")
    for n in names:
        print(f"  {n}: {describe_features(runs[n][-1].features)}")
    print()
    print("How: disk = bytes / (host time between the guest's port-0x610 marker writes around each dd - the median")
    print(f"of {NULL_PAIRS} empty marker intervals); the markers are /bin/pyvmm-outb runs in the guest, seen by pyvmm's")
    print("GuestNotify (hooked to forward each byte to a pipe) and by QEMU's isa-debugcon (a pipe chardev). The 4k")
    print("dd issue one O_DIRECT request at a time; sequential reads follow drop_caches. TCP = bytes / accept-to-EOF")
    print("time at the host end, a socket this script opens in the VM's network namespace (host->guest: EOF = the")
    print("guest closing after it read everything). MB = 10^6 bytes; ratios are pyvmm / QEMU (above 1: pyvmm faster).")
    print()
    print("command lines (NETNS: the namespace; <script>: the guest script; /dev/fd/N: the marker pipe; <hook>: runs")
    print("pyvmm.cli.main with the port-0x610 hook; pyvmm makes its own namespace and TAP with tap=auto):")
    for n in names:
        print(f"  {n}: {shown[n]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
