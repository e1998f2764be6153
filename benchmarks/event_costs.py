#!/usr/bin/env python3
"""Python work per guest event on the software CPU: function calls counted, not timed.

Boots pyvmm's default Debian guest on the software CPU (`--accel tcg`, 1 vCPU, a virtio-blk
disk on a scratch image, a virtio-net NIC on tap=auto) in this process, with a cProfile in
every thread, and runs a few workloads in the guest, each between two marker bytes the
guest writes to I/O port 0x610 (/bin/pyvmm-outb). At each marker this script snapshots the
profilers' call counts and the vCPUs' own counters; per workload it prints the guest
events of the interval (the software CPU's counters: interrupts injected, system calls,
exceptions, MMIO and port I/O exits, slices) and the Python function calls made in each
thread, divided by the workload's own unit (a system call, a disk request, a packet...).

The modules pyvmm compiles with mypyc (pyvmm/compiled.py) make no Python calls cProfile
sees: with the build in use their work is not counted; run with PYVMM_COMPILED=0 to count it
(the script says which). Counts, unlike times, do not depend on the host's load (the
interval's length does, so timer interrupts and slices per interval vary a little); the
cProfile makes the guest slower, so its times are not printed. Workloads:
  syscalls   dd if=/dev/zero of=/dev/null bs=1 count=N   (2 system calls per byte)
  shell      the busybox shell loop benchmarks/boot.py times
  blk4k      dd if=/dev/vda of=/dev/null bs=4k iflag=direct count=N (one request at a time)
  net        dd if=/dev/zero bs=1k count=N | nc 10.0.2.1 5001 (a host receiver in the namespace)
  netrx      nc 10.0.2.1 5002 | wc -c (a host sender in the namespace sends N KiB), per KiB received
  console    seq 1 N on the serial console (ttyS0), per byte written (boot.py's console row)

Per thread it also prints CPU time and context switches (voluntary and not) per unit, from
/proc/self/task: the switches do not depend on the load; the CPU time includes the profiler.

Runs as root (tap=auto makes a network namespace); the guest image is built on first use.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
# The VM runs in this process, and so do this script's own threads (the TCP receiver opens its
# socket once tap=auto's namespace exists, after the VM started): the seccomp filter the VM
# installs for the process would kill them. Counts do not depend on it.
os.environ.setdefault("PYVMM_SECCOMP", "off")

MARK_PORT = 0x610
NET_PORT = 5001
NET_RX_PORT = 5002
HOST_IP = "10.0.2.1"

_profiles: dict[str, cProfile.Profile] = {}
_native_ids: dict[str, int] = {}
_profiles_lock = threading.Lock()
_TICK = os.sysconf("SC_CLK_TCK")


def _profile_new_threads(*_args) -> None:
    """threading.setprofile hook: the first event in a new thread enables a C profiler there."""
    sys.setprofile(None)
    profile = cProfile.Profile()
    with _profiles_lock:
        name = threading.current_thread().name
        while name in _profiles:
            name += "+"
        _profiles[name] = profile
        _native_ids[name] = threading.get_native_id()
    profile.enable()


def _thread_usage(tid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of one of this process's threads so far; (0, 0) once it ended."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/self/task/{tid}/status") as f:
            switches = sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0
    return (int(fields[11]) + int(fields[12])) / _TICK, switches


def _usage() -> dict[str, tuple[float, int]]:
    with _profiles_lock:
        ids = dict(_native_ids)
    return {name: _thread_usage(tid) for name, tid in ids.items()}


def _snapshot() -> dict[str, list]:
    """Per thread: the profiler's raw entries so far (named later: no Python work at a marker)."""
    with _profiles_lock:
        return {name: profile.getstats() for name, profile in _profiles.items()}


def _calls(snapshot: dict[str, list]) -> dict[str, dict[str, int]]:
    """Per thread: calls per function (primitive and recursive)."""
    out: dict[str, dict[str, int]] = {}
    for name, entries in snapshot.items():
        per_function: dict[str, int] = {}
        for entry in entries:
            code = entry.code
            key = code if isinstance(code, str) else f"{pathlib.Path(code.co_filename).name}:{code.co_name}"
            per_function[key] = per_function.get(key, 0) + entry.callcount
        out[name] = per_function
    return out


class Marks:
    """What the guest's markers saw: (code, calls per thread, vCPU counters) in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict, dict, dict]] = []
        self.vcpus: list = []

    def vcpu_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for vcpu in self.vcpus:
            for key, value in vcpu.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def mark(self, code: int) -> None:
        self.seen.append((code, _snapshot(), self.vcpu_counts(), _usage()))


def _hook_pyvmm(marks: Marks) -> None:
    from pyvmm.devices.legacy import guest_notify
    from pyvmm.accel.tcg import vcpu as tcg_vcpu

    original_write = guest_notify.GuestNotify.write

    def write(self, offset, data):
        if offset == 0 and data and data[0] >= 0x10:
            marks.mark(data[0])
            return
        original_write(self, offset, data)

    guest_notify.GuestNotify.write = write
    original_init = tcg_vcpu.TcgVcpu.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        marks.vcpus.append(self)

    tcg_vcpu.TcgVcpu.__init__ = init


def _net_peers(stop: threading.Event, before: set[str], rx_bytes: int) -> None:
    """In the namespace tap=auto creates: drain connections to HOST_IP:NET_PORT (net), and send
    rx_bytes to each connection to NET_RX_PORT, then close it (netrx)."""
    from pyvmm.net.netns import call_in_netns

    while not stop.is_set():
        try:
            new = set(os.listdir("/run/netns")) - before
        except FileNotFoundError:
            new = set()
        if new:
            break
        time.sleep(0.2)
    else:
        return
    netns = new.pop()

    def listen(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(4)
        listener.settimeout(0.5)
        return listener

    for _ in range(50):
        try:
            listeners = call_in_netns(netns, lambda: [listen(NET_PORT), listen(NET_RX_PORT)])
            break
        except Exception:
            time.sleep(0.2)
    else:
        print(f"event_costs: no listener in {netns}", file=sys.stderr)
        return

    def drain(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass

    def send(conn: socket.socket) -> None:
        chunk = bytes(65536)
        left = rx_bytes
        while left > 0:
            left -= conn.send(chunk[:min(left, len(chunk))])

    def serve(listener: socket.socket, handle) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            with conn:
                handle(conn)

    sender = threading.Thread(target=serve, args=(listeners[1], send), daemon=True)
    sender.start()
    serve(listeners[0], drain)


WORKLOADS = {
    # name: (guest command, units, unit name)
    "syscalls": ("dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null", lambda n: 2 * n, "syscall"),
    "shell": ("i=0; while [ $i -lt {n} ]; do i=$((i+1)); done", lambda n: n, "iteration"),
    "blk4k": ("dd if=/dev/vda of=/dev/null bs=4k iflag=direct count={n} 2>/dev/null", lambda n: n, "request"),
    "net": (f"dd if=/dev/zero bs=1k count={{n}} 2>/dev/null | nc {HOST_IP} {NET_PORT}", lambda n: n, "KiB sent"),
    "netrx": (f"nc {HOST_IP} {NET_RX_PORT} | wc -c >/dev/null", lambda n: n, "KiB received"),
    "console": ("seq 1 {n}", lambda n: sum(len(str(i)) + 1 for i in range(1, n + 1)), "console byte"),
}
EVENT_KEYS = ("interrupts", "syscalls", "exceptions", "mmio", "port_io", "slices", "halts")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2000, help="units per workload (default 2000)")
    ap.add_argument("--only", action="append", choices=sorted(WORKLOADS), help="run only these workloads")
    ap.add_argument("--top", type=int, default=12, help="functions listed per workload and thread")
    ap.add_argument("--dump", metavar="DIR", help="also write each thread's whole-run profile to DIR (pstats files)")
    args = ap.parse_args()
    names = args.only or list(WORKLOADS)

    marks = Marks()
    _hook_pyvmm(marks)
    script = []
    for i, name in enumerate(names):
        command = WORKLOADS[name][0].format(n=args.count)
        script.append(f"pyvmm-outb {MARK_PORT} {0x20 + 2 * i}; {command}; pyvmm-outb {MARK_PORT} {0x21 + 2 * i}")
    stop = threading.Event()
    try:
        before = set(os.listdir("/run/netns"))
    except FileNotFoundError:
        before = set()
    receiver = threading.Thread(target=_net_peers, args=(stop, before, args.count * 1024), daemon=True)
    receiver.start()
    with tempfile.TemporaryDirectory() as tmp:
        disk = pathlib.Path(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        threading.setprofile(_profile_new_threads)
        from pyvmm.cli import main as pyvmm_main
        status = pyvmm_main(["run", "--cold", "--accel", "tcg", "--disk", f"{disk},transport=pci",
                             "--net", "tap=auto,transport=pci", "--", "sh", "-c", "; ".join(script)])
        threading.setprofile(None)
    stop.set()
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for name, profile in _profiles.items():
            profile.disable()
            profile.dump_stats(os.path.join(args.dump, name + ".pstats"))
    by_code = {code: (_calls(snapshot), counts, usage) for code, snapshot, counts, usage in marks.seen}
    print(f"load average {os.getloadavg()[0]:.2f} (counts do not depend on it); guest exit status {status}")
    from pyvmm import compiled

    in_use, why_not = compiled.status()
    print("compiled modules: " + ("in use: their functions run as C and are not counted below (PYVMM_COMPILED=0 "
                                  "counts them, as before 2026-12-06's mypyc build)" if in_use else f"not in use ({why_not})"))
    for i, name in enumerate(names):
        if 0x20 + 2 * i not in by_code or 0x21 + 2 * i not in by_code:
            print(f"{name}: markers missing")
            continue
        (calls0, counts0, usage0), (calls1, counts1, usage1) = by_code[0x20 + 2 * i], by_code[0x21 + 2 * i]
        units = WORKLOADS[name][1](args.count)
        unit = WORKLOADS[name][2]
        events = {key: counts1.get(key, 0) - counts0.get(key, 0) for key in EVENT_KEYS}
        print(f"\n== {name}: {units} units (unit: {unit})")
        print("  guest events: " + ", ".join(f"{key} {value}" for key, value in events.items()))
        print("  per " + unit + ": " + ", ".join(f"{key} {value / units:.3f}" for key, value in events.items()))
        for thread in sorted(calls1):
            diff = {fn: n - calls0.get(thread, {}).get(fn, 0) for fn, n in calls1[thread].items()}
            total = sum(diff.values())
            if total < units // 10:
                continue
            per_interrupt = f", {total / events['interrupts']:.0f} per interrupt" if events["interrupts"] else ""
            print(f"  thread {thread}: {total} Python calls, {total / units:.1f} per {unit}{per_interrupt}")
            if thread in usage1:
                cpu0, switches0 = usage0.get(thread, (0.0, 0))
                cpu, switches = usage1[thread][0] - cpu0, usage1[thread][1] - switches0
                print(f"      CPU {cpu * 1e6 / units:.0f} us and {switches / units:.2f} context switches "
                      f"per {unit} (the CPU time is inflated by the profiler)")
            for fn, n in sorted(diff.items(), key=lambda item: -item[1])[:args.top]:
                print(f"      {n:>9}  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
