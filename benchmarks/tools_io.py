#!/usr/bin/env python3
"""fio and iperf3 in the guest: virtio block and network under real tools, pyvmm vs QEMU, same run.

Every configuration boots pyvmm's default Debian guest (stock kernel, busybox initramfs) with
256 MiB, one vCPU and a software CPU (pyvmm `--accel tcg`: Unicorn; QEMU `-accel tcg`), with
  - the benchmark disk: a raw image, every block allocated, virtio-blk serial `bench`;
  - the tools disk: Debian 12's fio and iperf3 with every shared library they load, on a
    read-only ext4 image (guest_tools.py; built on first use into ~/.cache/pyvmm/images/,
    ~40 MB of .deb downloaded with apt-get download, nothing installed), serial `tools`;
  - a virtio NIC on a TAP in a network namespace of its own (host 10.0.2.1, guest 10.0.2.15);
in the same configurations as virtio_io.py:
  pyvmm pci    pyvmm run --accel tcg --disk BENCH,serial=bench,transport=pci
               --disk TOOLS,readonly,serial=tools,transport=pci --net tap=auto,mac=...,transport=pci
  pyvmm mmio   the same with transport=mmio (--mmio)
  pyvmm unplaced  pyvmm pci with PYVMM_TCG_HOST_CPU=any: the VM's threads where the kernel puts
               them, not on one host CPU (--unplaced; host/cpu_affinity.py)
  QEMU         q35, the PVH vmlinux pyvmm extracts, the same initramfs and command line (with
               the `pyvmm.ip=` token and `tsc=nowatchdog` pyvmm adds), virtio-blk-pci on both
               images (cache=writeback: the host page cache, as pyvmm's virtio-blk; the tools
               disk readonly=on), virtio-net-pci on a TAP this script creates in a new namespace.

In the guest, one fio process runs the jobs one after another (`--stonewall`), each
`--time_based --runtime=--seconds` on the raw /dev/vdX with O_DIRECT, libaio unless said:
  4k random read / write at iodepth 1 and 32, 4k random read at iodepth 32 with io_uring
  (when the guest kernel has it: a probe job decides), sequential read / write bs=1M, iodepth 8.
Figures are fio's own (terse output, the guest's clock): IOPS for 4k, MB/s for 1M.
Then iperf3 TCP, one stream, --seconds each way: `iperf3 -c 10.0.2.1` (guest -> host) and
`iperf3 -c 10.0.2.1 -R` (host -> guest) against `iperf3 -s -1 -J` servers this script runs on
the host in the VM's network namespace; the figure is the host server's (the host clock): bytes
received (guest -> host) or sent (host -> guest) over the test's seconds. MB = 10^6 bytes.

Both VMMs run the guest's code on a software CPU: guest CPU emulation dominates these numbers.
Runs on Debian 12 with Python 3.11 as root (namespaces, TAPs); installs qemu-system-x86 and
iperf3 (the host's server) with apt-get when missing. `--quick`: 2 s per test, a 32 MiB disk,
one run (about 2 minutes; the first use also builds the tools disk); the default (10 s per test,
256 MiB, 3 runs, median) takes about 15 minutes.
A kernel warning on a console fails the run, as in boot.py and virtio_io.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from boot import EXIT_LINE, MEMORY_MIB, QEMU, SRC, ensure_qemu, kernel_warnings, log, qemu_version, tcg_linux_args  # noqa: E402,E501
from guest_tools import GUEST_SETUP, TOOLS_SERIAL, tools_image  # noqa: E402
from net_host import (HOST_IP, IP_TOKEN, MAC, BenchError, _disk_image, kill_group, list_netns,  # noqa: E402
                      qemu_tap_namespace, remove_namespace, running)

TX_PORT, RX_PORT = 5201, 5202
BENCH_SERIAL = "bench"
MB = 1e6
# one line per fio job: name, error, then KiB moved, IOPS, runtime (ms) for reads and for writes
FIO = re.compile(rb"^@@BENCH fio (\S+) (-?\d+) ((?:[\d.]+ ){5}[\d.]+)$")
ERROR = re.compile(rb"^@@BENCH-ERROR (.*)$")

# fio jobs: (rw, bs, iodepth) -> name rw-bs-iodepth; libaio (the io_uring job: when the guest has it)
FIO_JOBS = (("randread", "4k", 1), ("randwrite", "4k", 1), ("randread", "4k", 32), ("randwrite", "4k", 32),
            ("read", "1M", 8), ("write", "1M", 8))
URING_JOB = "uring-randread-4k-32"
LABELS = {f"{rw}-{bs}-{qd}": f"fio {'seq ' if bs == '1M' else '4k random '}{rw.removeprefix('rand')}"
                             f"{' bs=1M' if bs == '1M' else ''}, iodepth {qd}" for rw, bs, qd in FIO_JOBS}
LABELS[URING_JOB] = "fio 4k random read, iodepth 32, io_uring"
NET_TESTS = {"tx": ("iperf3 TCP guest -> host", TX_PORT), "rx": ("iperf3 TCP host -> guest", RX_PORT)}


def guest_script(seconds: int) -> str:
    """The guest's shell script (base64 on the kernel command line: kept short). One fio process runs
    every job, one after another (a global --stonewall); one terse line per job, cut to the fields used."""
    jobs = " ".join(",".join(map(str, job)) for job in FIO_JOBS)
    uring = f"--name={URING_JOB} --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring"
    return f"""\
f(){{ echo "@@BENCH-ERROR $*";exit 1;}}
{GUEST_SETUP}B=$(s {BENCH_SERIAL});[ -n "$B" ]||f no benchmark disk
O="--filename=$B --direct=1 --ioengine=libaio --stonewall";J=
for j in {jobs};do IFS=,;set -- $j;unset IFS;J="$J --name=$1-$2-$3 --rw=$1 --bs=$2 --iodepth=$3";done
fio $O --name=p --ioengine=io_uring --rw=read --bs=4k --size=4k >/dev/null 2>&1&&J="$J {uring}"
fio --output-format=terse --time_based --runtime={seconds} $O $J >/tmp/o 2>/tmp/e||\
f fio: $(tail -n1 /tmp/e)
awk -F';' '{{print "@@BENCH fio",$3,$5,$6,$8,$9,$47,$49,$50}}' /tmp/o
w(){{ i=$((i+1));[ $i -lt 30 ]||f $1;sleep 1;}}
p(){{ i=0;until iperf3 -c {HOST_IP} -t {seconds} $@ >/tmp/e 2>&1;do w "iperf3 $@: $(tail -n1 /tmp/e)";done;}}
p -p {TX_PORT};p -p {RX_PORT} -R
"""


def ensure_iperf3() -> None:
    if shutil.which("iperf3"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "iperf3"]
    log("installing iperf3 (the host's server)")
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)


@dataclasses.dataclass
class Config:
    name: str
    vmm: str          # "pyvmm" | "qemu"
    transport: str    # "pci" | "mmio"
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra environment for the VMM


@dataclasses.dataclass
class Run:
    values: dict[str, float]   # test -> IOPS or MB/s
    wall: float
    host_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # iperf3 test -> its length, host clock


def guest_images(script: str):
    """(the default image, the tools disk, the PVH vmlinux QEMU boots), made on first use; a
    failure ends `script` with one line."""
    from pyvmm.images import ImageError, default_image
    from pyvmm.loader.linux import extract_vmlinux

    try:
        image = default_image()
        tools = tools_image()
    except ImageError as exc:
        sys.exit(f"{script}: {exc}")
    return image, tools, str(extract_vmlinux(image.kernel))


def argv_for(config: Config, image, vmlinux: str, disk: pathlib.Path, tools: pathlib.Path, guest: list[str],
             netns: str | None) -> list[str]:
    if config.vmm == "pyvmm":
        t = config.transport
        return [sys.executable, "-m", "pyvmm.cli", "run", "--accel", "tcg", "--memory", f"{MEMORY_MIB}M",
                "--cpus", "1", "--disk", f"{disk},serial={BENCH_SERIAL},transport={t}",
                "--disk", f"{tools},readonly,serial={TOOLS_SERIAL},transport={t}",
                "--net", f"tap=auto,mac={MAC},transport={t}", "--", *guest]
    return ["ip", "netns", "exec", netns,
            QEMU, "-M", "q35", "-accel", "tcg", "-m", str(MEMORY_MIB), "-smp", "1",
            "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
            "-kernel", vmlinux, "-initrd", str(image.initramfs),
            "-append", image.command_line(guest, extra=f"{tcg_linux_args()} {IP_TOKEN}"),
            "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=writeback",
            "-device", f"virtio-blk-pci,drive=disk0,serial={BENCH_SERIAL}",
            "-drive", f"file={tools},format=raw,if=none,id=tools,cache=writeback,readonly=on",
            "-device", f"virtio-blk-pci,drive=tools,serial={TOOLS_SERIAL}",
            "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={MAC}"]


def shown_argv(argv: list[str]) -> str:
    out = [re.sub(r"pyvmm\.cmd=\S+", "pyvmm.cmd=<script>", a) for a in argv]
    if "--" in out:
        out = out[:out.index("--")] + ["--", "sh", "-c", "<script>"]
    return shlex.join(out)


def start_servers(netns: str, workdir: pathlib.Path, tag: str) -> dict[str, tuple[subprocess.Popen, pathlib.Path]]:
    """One `iperf3 -s -1 -J` per direction inside `netns`, each writing its JSON report to a file."""
    servers = {}
    for test, (_, port) in NET_TESTS.items():
        report = workdir / f"iperf3-{tag}-{test}.json"
        report.unlink(missing_ok=True)   # iperf3 appends to its --logfile
        deadline = time.monotonic() + 10
        while True:  # `ip netns add` creates the name before it mounts the namespace on it: retry
            proc = subprocess.Popen(["ip", "netns", "exec", netns, "iperf3", "-s", "-1", "-p", str(port), "-J",
                                     "--logfile", str(report)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
            try:
                proc.wait(0.3)
            except subprocess.TimeoutExpired:
                break   # listening
            if time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace").strip()
                raise BenchError(f"cannot start iperf3 -s in {netns}: {err or f'exit status {proc.returncode}'}")
        servers[test] = (proc, report)
    return servers


def server_rate(test: str, report: pathlib.Path) -> tuple[float, float]:
    """(MB/s, seconds) the host's iperf3 server measured: received (guest -> host) or sent (host -> guest).
    The guest's client ends the test after --seconds by the guest's clock: the seconds the server
    saw show how far that clock is from the host's (fio's figures use the guest's clock)."""
    try:
        result = json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{NET_TESTS[test][0]}: no report from the host's iperf3 server ({exc})") from None
    if "error" in result:
        raise BenchError(f"{NET_TESTS[test][0]}: the host's iperf3 server: {result['error']}")
    total = result["end"]["sum_received" if test == "tx" else "sum_sent"]
    if not total.get("bytes") or not total.get("seconds"):
        raise BenchError(f"{NET_TESTS[test][0]}: the host's iperf3 server moved no data")
    return total["bytes"] / total["seconds"] / MB, total["seconds"]


def run_once(config: Config, image, vmlinux: str, disk: pathlib.Path, tools: pathlib.Path, seconds: int,
             timeout: float, workdir: pathlib.Path, tag: str) -> Run:
    guest = ["sh", "-c", guest_script(seconds)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
               **config.env)
    netns, proc, servers = None, None, {}
    lines: list[bytes] = []
    stderr: list[bytes] = []
    try:
        if config.vmm == "qemu":
            netns = qemu_tap_namespace(f"pyvmm-bench-{os.getpid()}-{tag}")
            servers = start_servers(netns, workdir, tag)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv_for(config, image, vmlinux, disk, tools, guest, netns), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        readers = [threading.Thread(target=lambda: lines.extend(ln.rstrip(b"\r\n") for ln in proc.stdout), daemon=True),
                   threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)]
        for t in readers:
            t.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        if config.vmm == "pyvmm":
            servers = servers_in_pyvmm_namespace(proc, workdir, tag, t0 + timeout)
        proc.wait()
        wall = time.monotonic() - t0
        killer.cancel()
        for t in readers:
            t.join(10)
        wait_for_servers(servers)

        console = b"\n".join(lines)
        tail = (f"\n--- console (end) ---\n{console[-3000:].decode(errors='replace')}"
                f"\n--- stderr (end) ---\n{b''.join(stderr)[-2000:].decode(errors='replace')}")
        for line in lines:
            if m := ERROR.match(line):
                raise BenchError(f"{config.name}: in the guest: {m.group(1).decode(errors='replace')}{tail}")
        if warned := kernel_warnings(console):
            raise BenchError(f"{config.name}: {warned}{tail}")
        if wall >= timeout:
            raise BenchError(f"{config.name}: no power-off within --timeout {timeout:g} s{tail}")
        status = EXIT_LINE.search(console)
        if status is None or status.group(1) != b"0":
            raise BenchError(f"{config.name}: the guest did not finish its script (VMM exit status "
                             f"{proc.returncode}){tail}")

        values: dict[str, float] = {}
        for line in lines:
            if m := FIO.match(line):
                name, error = m.group(1).decode(), int(m.group(2))
                if name not in LABELS or error:
                    raise BenchError(f"{config.name}: fio job {name}: error {error}{tail}")
                fields = [float(x) for x in m.group(3).split()]
                kib, iops, runtime_ms = fields[:3] if "read" in name else fields[3:]
                if kib <= 0 or runtime_ms <= 0:
                    raise BenchError(f"{config.name}: fio job {name} moved no data{tail}")
                values[name] = kib * 1024 / (runtime_ms / 1000) / MB if "-1M-" in name else iops
        missing = [n for n in LABELS if n not in values and n != URING_JOB]
        if missing:
            raise BenchError(f"{config.name}: no fio result for {', '.join(missing)}{tail}")
        if not servers:
            raise BenchError(f"{config.name}: no network namespace pyvmm-{proc.pid}-* appeared{tail}")
        run = Run(values, wall)
        for test, (_, report) in servers.items():
            values[test], run.host_seconds[test] = server_rate(test, report)
        return run
    finally:
        end_run(config.vmm, proc, servers, netns)


def servers_in_pyvmm_namespace(proc: subprocess.Popen, workdir: pathlib.Path, tag: str,
                               deadline: float) -> dict[str, tuple[subprocess.Popen, pathlib.Path]]:
    """The iperf3 servers, started once pyvmm made its namespace pyvmm-<pid>-<n> (while it builds
    the VM); none if it ended first or the deadline passed."""
    while running(proc.pid) and time.monotonic() < deadline:
        found = [n for n in list_netns() if n.startswith(f"pyvmm-{proc.pid}-")]
        if found:
            return start_servers(found[0], workdir, tag)
        time.sleep(0.05)
    return {}


def wait_for_servers(servers: dict[str, tuple[subprocess.Popen, pathlib.Path]]) -> None:
    """Give each `iperf3 -s -1` up to 10 s to write its report and end."""
    for server, _ in servers.values():
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            pass


def end_run(vmm: str, proc: subprocess.Popen | None, servers: dict[str, tuple[subprocess.Popen, pathlib.Path]],
            netns: str | None) -> None:
    """Kill what still runs of one run (the VMM, the servers) and remove its namespace."""
    kill_group(proc)
    for server, _ in servers.values():
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    remove_namespace(vmm, proc, netns)

def report(configs: list[Config], runs: dict[str, list[Run]], shown: dict[str, str], args, image, disk_mib: int,
           load: tuple, load_after: tuple, wall: float) -> None:
    names = [c.name for c in configs]
    qemu = "QEMU" if "QEMU" in names else None
    others = [n for n in names if n != "QEMU"]

    def med(name: str, test: str) -> float | None:
        got = [run.values[test] for run in runs[name] if test in run.values]
        return statistics.median(got) if got else None

    print(f"fio and iperf3 in the guest: median of {args.repeat} run(s) per configuration, configurations "
          f"interleaved, {args.seconds} s per test")
    print(f"guest: Linux {image.kernel_version} + busybox initramfs + tools disk (Debian's fio and iperf3), "
          f"{MEMORY_MIB} MiB, 1 vCPU, software CPU (pyvmm --accel tcg: Unicorn; QEMU -accel tcg)")
    print(f"host: {os.cpu_count()} CPUs, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          f"{load_after[0]:.2f}; {wall:.0f} s of runs")
    if qemu:
        print(f"QEMU: {qemu_version()}")
    print(f"benchmark disk: raw image of {disk_mib} MiB (all blocks allocated) on {args.workdir}; QEMU cache=writeback")
    print()
    width = max(12, *(len(n) + 2 for n in names))  # ("pyvmm unplaced" is 14 characters)
    head = f"{'test':<42}{'unit':>6}" + "".join(f"{n:>{width}}" for n in names) + \
        "".join(f"{n.split()[-1] + '/QEMU':>15}" for n in (others if qemu else []))
    print(head)
    print("-" * len(head))
    rows = [(t, label, "MB/s" if "-1M-" in t else "IOPS") for t, label in LABELS.items()]
    rows += [(t, label, "MB/s") for t, (label, _) in NET_TESTS.items()]
    for test, label, unit in rows:
        values = {n: med(n, test) for n in names}
        line = f"{label:<42}{unit:>6}" + "".join(f"{v:>{width}.1f}" if v is not None else f"{'n/a':>{width}}"
                                                 for v in values.values())
        if qemu:
            line += "".join(f"{values[n] / values[qemu]:>14.3f}x" if values[n] and values[qemu] else f"{'':>15}"
                            for n in others)
        print(line)
    if any(med(n, URING_JOB) is None for n in names):
        print("n/a: the guest kernel refused io_uring (the probe job failed)")
    print()
    print("per run:")
    for n in names:
        for i, run in enumerate(runs[n]):
            print(f"  {n} #{i + 1}: " + ", ".join(f"{t} {v:.1f}" for t, v in run.values.items()) +
                  f"; iperf3 -t {args.seconds} tests lasted " +
                  "/".join(f"{run.host_seconds[t]:.2f}" for t in NET_TESTS) + f" s by the host's clock"
                  f"; whole run {run.wall:.1f} s")
    print()
    print("fio: its own figures (terse output; the guest's clock), one job at a time, O_DIRECT on the raw disk. How")
    print("far the guest's clock is from the host's: the iperf3 tests, ended by the guest after -t seconds of its")
    print("clock, lasted the seconds shown per run by the host's.")
    print("iperf3: the host server's figure (`iperf3 -s -1 -J` in the VM's namespace; the host clock): bytes received")
    print("(guest -> host) or sent (host -> guest) / the test's seconds. MB = 10^6 bytes; ratios pyvmm / QEMU (above 1:")
    print("pyvmm faster). Both VMMs emulate the guest's CPU: these figures measure the whole stack, not the devices alone.")
    print()
    print("command lines (<script>: the guest script; pyvmm makes its own namespace and TAP with tap=auto):")
    for n in names:
        print(f"  {n}: {shown[n]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s per test, a 32 MiB disk, one run")
    ap.add_argument("--repeat", "-r", type=int, metavar="N", help="runs per configuration (median; default 3, "
                                                                   "1 with --quick)")
    ap.add_argument("--seconds", type=int, metavar="S", help="seconds per fio job and iperf3 test (default 10, "
                                                              "--quick 2)")
    ap.add_argument("--disk-mib", type=int, metavar="MIB", help="benchmark disk size (default 256, --quick 32)")
    ap.add_argument("--skip-qemu", action="store_true", help="measure pyvmm only")
    ap.add_argument("--mmio", action="store_true", help="add a pyvmm row with virtio-mmio")
    ap.add_argument("--unplaced", action="store_true",
                    help="add a pyvmm row whose threads are not kept on one host CPU (PYVMM_TCG_HOST_CPU=any)")
    ap.add_argument("--timeout", type=float, default=900, metavar="S", help="seconds allowed per run (default 900)")
    ap.add_argument("--workdir", metavar="DIR", default="/var/tmp",
                    help="where the benchmark disk images go (default /var/tmp; removed at the end)")
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.seconds = args.seconds or (2 if args.quick else 10)
    disk_mib = args.disk_mib or (32 if args.quick else 256)
    if args.repeat < 1 or args.seconds < 1 or disk_mib < 8:
        ap.error("--repeat and --seconds must be at least 1, --disk-mib at least 8")
    if os.geteuid() != 0:
        sys.exit("tools_io.py: run as root (network namespaces and TAPs)")
    if shutil.which("ip") is None:
        sys.exit("tools_io.py: the ip command (iproute2) is missing")

    def stop(signum, frame):  # SIGTERM/SIGHUP end the run like Ctrl-C: the finally blocks clean up
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    if not args.skip_qemu:
        ensure_qemu()
    ensure_iperf3()
    image, tools, vmlinux = guest_images("tools_io.py")
    configs = [Config("pyvmm pci", "pyvmm", "pci")]
    if args.mmio:
        configs.append(Config("pyvmm mmio", "pyvmm", "mmio"))
    if args.unplaced:
        configs.append(Config("pyvmm unplaced", "pyvmm", "pci", {"PYVMM_TCG_HOST_CPU": "any"}))
    if not args.skip_qemu:
        configs.append(Config("QEMU", "qemu", "pci"))

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="pyvmm-tools-io-", dir=args.workdir))
    runs: dict[str, list[Run]] = {c.name: [] for c in configs}
    shown: dict[str, str] = {}
    try:
        disks = {c.name: workdir / f"{c.name.replace(' ', '-')}.img" for c in configs}
        for path in disks.values():
            _disk_image(path, disk_mib)
        load = os.getloadavg()
        log(f"load average before the runs: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
        wall0 = time.monotonic()
        for r in range(args.repeat):
            for i, c in enumerate(configs):  # interleaved: drifting host load hits every configuration alike
                log(f"run {r + 1}/{args.repeat}: {c.name}")
                shown[c.name] = "".join(f"{k}={v} " for k, v in c.env.items()) + shown_argv(
                    argv_for(c, image, vmlinux, disks[c.name], tools, ["sh", "-c", "x"], "NETNS"))
                run = run_once(c, image, vmlinux, disks[c.name], tools, args.seconds, args.timeout, workdir,
                               f"r{r}c{i}")
                runs[c.name].append(run)
                log("  " + ", ".join(f"{k} {v:.1f}" for k, v in run.values.items()) + f"; {run.wall:.1f} s")
        wall = time.monotonic() - wall0
        load_after = os.getloadavg()
    except BenchError as exc:
        print(f"tools_io.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"tools_io.py: interrupted ({exc or 'Ctrl-C'}); cleaned up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(configs, runs, shown, args, image, disk_mib, load, load_after, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
