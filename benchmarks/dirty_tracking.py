#!/usr/bin/env python3
"""What dirty-page tracking costs a running guest on the software CPU, pyvmm next to QEMU TCG.

The guest (pyvmm.guests "dirtier", a Multiboot ELF both VMMs boot) stores one word every
--stride bytes over --mib MiB, pass after pass, and counts passes in memory; the host reads
the count to get the guest's write rate: pages written per second of the vCPU thread's CPU
time (user + kernel, so write faults count; the machine's other load does not skew it), and
per second of wall time. Each mode is measured for --seconds, modes taking turns, --repeat
times; the table shows medians.

pyvmm (the software CPU, in this process):
  off                 no tracking
  on                  Vm.start_dirty_log(), never collected: each page's first write
                      after the protection costs a (kernel-resolved) write fault, then nothing
  on, collect Xs      dirty_log() every X seconds, as pre-copy migration's rounds do: every
                      page written again after each collection faults once more
QEMU 7.2 TCG (-M pc, the same guest and command line):
  off                 no tracking
  calc-dirty-rate     QMP calc-dirty-rate (mode page-sampling: it hashes sampled pages, no
                      dirty log) over a 1 s window: QEMU's estimate of the dirty rate, to
                      set beside pyvmm's. Its dirty-bitmap mode, which would switch QEMU's
                      dirty log on, kills QEMU 7.2 with TCG (SIGSEGV), so it is not used
  migrating           migrate to exec:cat>/dev/null at --qemu-bandwidth MiB/s with a 1 ms
                      downtime limit, so it never converges: the dirty log is synced every
                      iteration and the migration thread sends all the while (then cancelled)

Run: .venv/bin/python benchmarks/dirty_tracking.py [--skip-qemu] (about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PASSES = 0x1000000 - 0x1000  # where the guest counts its passes (dirtier.S)
PAGE = 4096


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- pyvmm ----------------------------------------------------------------------------------

class PyvmmGuest:
    def __init__(self, kernel: str, mib: int, stride: int) -> None:
        from pyvmm.accel.select import choose_accelerator
        from pyvmm.builder import build_vm
        from pyvmm.config import MachineConfig

        config = MachineConfig(kernel=kernel, memory=(mib + 32) << 20, cmdline=f"mib={mib} stride={stride}")
        self.vm = build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create())
        self.vm.start()
        wait_for(lambda: self.passes() > 0, "the pyvmm guest never completed a pass")

    def passes(self) -> int:
        return self.vm.memory.read_u32(PASSES)

    def cpu_seconds(self) -> float:
        """CPU time of the thread that runs the vCPU (user and kernel: write faults count)."""
        ident = self.vm.vcpus[0].thread_ident
        assert ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(ident))

    def close(self) -> None:
        self.vm.close()


def measure_pyvmm(guest: PyvmmGuest, mode: str, seconds: float, pages_per_pass: int) -> dict:
    vm = guest.vm
    collector = None
    stop = threading.Event()
    collects: list[tuple[float, int]] = []  # (seconds the collection took, pages it reported)
    if mode != "off":
        vm.start_dirty_log()
        vm.dirty_log()
    if mode.startswith("collect"):
        interval = float(mode.split()[1])

        def collect() -> None:
            while not stop.wait(interval):
                began = time.perf_counter()
                pages = vm.dirty_log().count()
                collects.append((time.perf_counter() - began, pages))

        collector = threading.Thread(target=collect, daemon=True)
        collector.start()
    result = rate_over(guest, seconds, pages_per_pass)
    stop.set()
    if collector is not None:
        collector.join()
        result["dirty_rate"] = vm.dirty_rate()  # distinct pages per second, as pre-copy sees them
    if mode != "off":
        vm.stop_dirty_log()
    if collects:
        result["collect_ms"] = statistics.median(c[0] for c in collects) * 1000
        result["collected_pages"] = statistics.median(c[1] for c in collects)
    return result


# --- QEMU ---------------------------------------------------------------------------------

class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 30
        while True:  # QEMU creates the socket file a moment before it listens
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QEMU closed its QMP socket")
            message = json.loads(line)
            if "event" not in message:
                return message

    def command(self, name: str, **arguments) -> object:
        self.file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        self.sock.close()


class QemuGuest:
    def __init__(self, kernel: str, mib: int, stride: int, directory: str) -> None:
        qmp_path = os.path.join(directory, "qmp.sock")
        self.argv = ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-name", "dirtier,debug-threads=on", "-m", str(mib + 32), "-nodefaults",
                     "-display", "none", "-serial", "null", "-kernel", kernel, "-append", f"mib={mib} stride={stride}",
                     "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(qmp_path) or self.process.poll() is not None, "QEMU did not start")
        if self.process.poll() is not None:
            raise RuntimeError(f"QEMU failed: {self.process.stderr.read().decode()[-500:]}")
        self.qmp = Qmp(qmp_path)
        wait_for(lambda: self.passes() > 0, "the QEMU guest never completed a pass")

    def cpu_seconds(self) -> float:
        """CPU time of QEMU's vCPU thread ("CPU 0/TCG"), user and kernel."""
        task = Path(f"/proc/{self.process.pid}/task")
        for thread in task.iterdir():
            if (thread / "comm").read_text().strip().startswith("CPU 0/"):
                fields = (thread / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        raise RuntimeError("QEMU's vCPU thread was not found")

    def passes(self) -> int:
        text = self.qmp.command("human-monitor-command", **{"command-line": f"xp /1wu {PASSES:#x}"})
        return int(str(text).split(":")[1].split()[0])

    def close(self) -> None:
        self.qmp.close()
        self.process.kill()
        self.process.wait()


def measure_qemu(guest: QemuGuest, mode: str, seconds: float, pages_per_pass: int, bandwidth_mib: int) -> dict:
    qmp = guest.qmp
    result: dict = {}
    if mode == "calc-dirty-rate":
        calc = max(1, round(seconds))
        qmp.command("calc-dirty-rate", **{"calc-time": calc, "mode": "page-sampling"})
        result.update(rate_over(guest, calc * 0.8, pages_per_pass))  # inside the window
        wait_for(lambda: qmp.command("query-dirty-rate")["status"] == "measured", "calc-dirty-rate never finished")
        result["dirty_rate"] = qmp.command("query-dirty-rate")["dirty-rate"] * 2**20 / PAGE  # MiB/s -> pages/s
        return result
    if mode == "migrating":
        qmp.command("migrate-set-parameters", **{"max-bandwidth": bandwidth_mib << 20, "downtime-limit": 1})
        qmp.command("migrate", uri="exec:cat > /dev/null")
        time.sleep(0.5)  # past the first pass's start
        result.update(rate_over(guest, seconds, pages_per_pass))
        info = qmp.command("query-migrate")
        qmp.command("migrate_cancel")
        wait_for(lambda: qmp.command("query-migrate").get("status") in ("cancelled", "failed", "completed"),
                 "QEMU's migration did not cancel")
        result["dirty_rate"] = info.get("ram", {}).get("dirty-pages-rate")
        return result
    result.update(rate_over(guest, seconds, pages_per_pass))
    return result


# --- common ---------------------------------------------------------------------------------

def wait_for(condition, message: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.02)


def rate_over(guest, seconds: float, pages_per_pass: int) -> dict:
    """Pages the guest wrote per second over `seconds` of wall time ("wall") and per second of
    its vCPU thread's CPU time ("rate": what the machine's other load does not skew)."""
    first, began, cpu = guest.passes(), time.perf_counter(), guest.cpu_seconds()
    time.sleep(seconds)
    last, ended, cpu_end = guest.passes(), time.perf_counter(), guest.cpu_seconds()
    pages = (last - first) * pages_per_pass
    return {"rate": pages / max(cpu_end - cpu, 1e-9), "wall": pages / (ended - began),
            "cpu_share": (cpu_end - cpu) / (ended - began)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB the guest writes over (default 64)")
    parser.add_argument("--stride", type=int, default=4096, help="bytes between its stores (default 4096)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--collect", default="0.1,1", help="pyvmm collection intervals in seconds")
    parser.add_argument("--qemu-bandwidth", type=int, default=32, help="MiB/s of QEMU's never-converging migration")
    parser.add_argument("--skip-qemu", action="store_true")
    args = parser.parse_args(argv)
    if args.mib < 1 or args.stride < 4 or args.stride % 4 or args.seconds <= 0 or args.repeat < 1:
        parser.error("--mib >= 1, --stride a positive multiple of 4, --seconds > 0, --repeat >= 1")
    from pyvmm.guests import build
    from pyvmm.memory.dirty import host_tracking_problem

    problem = host_tracking_problem()
    if problem is not None:
        print(f"dirty_tracking: {problem}", file=sys.stderr)
        return 2
    kernel = str(build("dirtier"))
    pages_per_pass = (args.mib << 20) // max(args.stride, PAGE) if args.stride >= PAGE else (args.mib << 20) // PAGE
    writes_per_page = max(1, PAGE // args.stride)
    pyvmm_modes = ["off", "on"] + [f"collect {interval}" for interval in args.collect.split(",") if interval]
    qemu_modes = ["off", "calc-dirty-rate", "migrating"]
    if not args.skip_qemu and shutil.which("qemu-system-x86_64") is None:
        log("qemu-system-x86_64 is not installed: apt-get install qemu-system-x86, or --skip-qemu")
        return 2
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as directory:
        guests: list[tuple[str, object, list[str]]] = [("pyvmm", PyvmmGuest(kernel, args.mib, args.stride), pyvmm_modes)]
        if not args.skip_qemu:
            guests.append(("QEMU", QemuGuest(kernel, args.mib, args.stride, directory), qemu_modes))
        try:
            for round_ in range(args.repeat):
                for vmm, guest, modes in guests:
                    for mode in modes:
                        if vmm == "pyvmm":
                            result = measure_pyvmm(guest, mode, args.seconds, pages_per_pass)  # type: ignore[arg-type]
                        else:
                            result = measure_qemu(guest, mode, args.seconds, pages_per_pass, args.qemu_bandwidth)  # type: ignore[arg-type]
                        results.setdefault((vmm, mode), []).append(result)
                        log(f"round {round_ + 1}: {vmm} {mode}: {result['rate']:,.0f} pages/CPU-s, {result['wall']:,.0f} pages/s")
        finally:
            for _, guest, _ in guests:
                guest.close()  # type: ignore[attr-defined]
    print(f"\nGuest: {args.mib} MiB written pass after pass, {writes_per_page} store(s) per page "
          f"(stride {args.stride}); {args.seconds:g} s per measurement, median of {args.repeat}; software CPU")
    print(f"{'VMM':6} {'tracking':16} {'pages/CPU-s':>12} {'vs off':>7} {'pages/s wall':>13} {'vCPU busy':>9} "
          f"{'dirty rate seen':>16} {'collect':>9}")
    for vmm in ("pyvmm", "QEMU"):
        baseline = None
        for (who, mode), runs in results.items():
            if who != vmm:
                continue
            rate = statistics.median(r["rate"] for r in runs)
            baseline = rate if mode == "off" else baseline
            seen = [r["dirty_rate"] for r in runs if r.get("dirty_rate") is not None]
            collect = [r["collect_ms"] for r in runs if "collect_ms" in r]
            print(f"{vmm:6} {mode:16} {rate:12,.0f} {rate / baseline if baseline else 1:7.2f} "
                  f"{statistics.median(r['wall'] for r in runs):13,.0f} "
                  f"{statistics.median(r['cpu_share'] for r in runs):9.0%} "
                  f"{(f'{statistics.median(seen):,.0f}/s' if seen else '-'):>16} "
                  f"{(f'{statistics.median(collect):.1f} ms' if collect else '-'):>9}")
    if not args.skip_qemu:
        print("QEMU: " + " ".join(guests_argv(args, kernel)))
    return 0


def guests_argv(args, kernel: str) -> list[str]:
    return ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-name", "dirtier,debug-threads=on", "-m", str(args.mib + 32), "-nodefaults", "-display",
            "none", "-serial", "null", "-kernel", kernel, "-append", f"'mib={args.mib} stride={args.stride}'", "-qmp", "unix:..."]


if __name__ == "__main__":
    sys.exit(main())
