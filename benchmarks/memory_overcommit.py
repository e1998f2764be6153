#!/usr/bin/env python3
"""Host memory of idle guests with free page reporting and KSM, and how fast an inflate frees
memory: pyvmm next to QEMU, same guest, same run.

Both VMMs run pyvmm's default Debian guest (256 MiB, one vCPU, software CPU: pyvmm's Unicorn,
QEMU's TCG on microvm with the same PVH vmlinux, initramfs and command line, as snapshot.py).
Rows:

  idle          total PSS (/proc/PID/smaps_rollup) of --count guests booted and idle (the
                guest's command touches 100 MiB and frees it first, as a guest that did some
                work), each VMM process on its own, for four configurations:
                  none   no balloon, no KSM (QEMU: mem-merge=off)
                  fpr    a balloon with free page reporting (QEMU: virtio-balloon-device,
                         free-page-reporting=on)
                  ksm    guest RAM mergeable (pyvmm --ksm; QEMU mem-merge=on), KSM running
                  both   both
                KSM runs (run=1, pages_to_scan 1000, sleep 10 ms) only for the KSM rows and
                is put back after; PSS is read after --settle seconds
  inflate       one guest that touched 160 MiB and freed it (no reporting): the balloon's
                target is set to half its memory (pyvmm: the device's target; QEMU: QMP
                `balloon`), then the time until the VMM process's RSS has fallen by 100 MiB,
                and until the guest says the balloon is full

Goals (issue 15): with free page reporting and KSM, pyvmm's host memory for the idle guests at
or below QEMU's with the same features; an inflate shows up as freed host memory within a
second. Needs root (KSM) and QEMU (installed with apt-get if missing, unless --skip-qemu).

    .venv/bin/python benchmarks/memory_overcommit.py [--count 6] [--rows idle,inflate] [--skip-qemu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import pyvmm_side  # noqa: E402
import qemu_side  # noqa: E402

MIB = 1 << 20
KSM = Path("/sys/kernel/mm/ksm")
CONFIGS = {"none": (False, False), "fpr": (True, False), "ksm": (False, True), "both": (True, True)}
# the guest's command: touch 100 MiB (random: nothing for KSM), free it, then idle
WORKED = ["sh", "-c", "dd if=/dev/urandom of=/w bs=1M count=100 2>/dev/null; rm /w; sleep 100000"]
FILLED = ["sh", "-c", "dd if=/dev/urandom of=/w bs=1M count=80 2>/dev/null; "
          "dd if=/dev/urandom of=/dev/w bs=1M count=80 2>/dev/null; rm /w /dev/w; sleep 100000"]

IDLE_CHILD = """
    import sys
    sys.path.insert(0, sys.argv[1])
    from pyvmm.config import BalloonConfig
    from pyvmm_side import booted_vm
    fpr, ksm = sys.argv[2] == "1", sys.argv[3] == "1"
    vm = booted_vm(sys.argv[4:], balloon=BalloonConfig(free_page_reporting=True) if fpr else None, ksm=ksm)
    print("booted", flush=True)
    sys.stdin.read()
    vm.close()
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class KsmRunning:
    """KSM on and scanning fast for a block; its settings put back after."""

    SETTINGS = {"run": "1", "pages_to_scan": "1000", "sleep_millisecs": "10"}

    def __enter__(self):
        self.saved = {name: (KSM / name).read_text().strip() for name in self.SETTINGS}
        for name, value in self.SETTINGS.items():
            (KSM / name).write_text(value)
        return self

    def __exit__(self, *exc) -> None:
        (KSM / "run").write_text("2")  # unmerge: the next rows start from unshared pages
        for name, value in self.saved.items():
            (KSM / name).write_text(value)


def qemu_guest(image, vmlinux, command, extra, *, balloon: bool, fpr: bool, merge: bool) -> qemu_side.QemuGuest:
    """A QEMU guest with a balloon (microvm's virtio-mmio, found through ACPI) and mem-merge set."""
    devices = ("-device", f"virtio-balloon-device,free-page-reporting={'on' if fpr else 'off'}") if balloon else ()
    return qemu_side.QemuGuest(image, vmlinux, command, extra, machine=f"microvm,mem-merge={'on' if merge else 'off'}",
                               extra_args=devices)


class Bench:
    def __init__(self, args) -> None:
        from pyvmm.accel.tcg.accelerator import TcgAccelerator
        from pyvmm.accel.tcg.host_tsc import host_tsc_hz
        from pyvmm.images import default_image
        from pyvmm.loader.linux import extract_vmlinux

        self.args = args
        self.image = default_image()
        self.vmlinux = str(extract_vmlinux(self.image.kernel))
        self.qemu_extra = f"{TcgAccelerator.linux_cmdline} tsc_early_khz={host_tsc_hz() // 1000}"
        self.dir = Path(tempfile.mkdtemp(prefix="pyvmm-bench-memory-"))

    # --- idle guests ------------------------------------------------------------------------

    def pyvmm_idle(self, fpr: bool, ksm: bool) -> int:
        children = [pyvmm_side._child(IDLE_CHILD, str(HERE), "1" if fpr else "0", "1" if ksm else "0", *WORKED)
                    for _ in range(self.args.count)]
        return pyvmm_side.many_pss(children, b"booted", settle=self.args.settle)

    def qemu_idle(self, fpr: bool, ksm: bool) -> int:
        guests = []
        try:
            for _ in range(self.args.count):
                guests.append(qemu_guest(self.image, self.vmlinux, WORKED, self.qemu_extra, balloon=fpr,
                                               fpr=fpr, merge=ksm))
            for guest in guests:
                guest.wait_booted(600)
            time.sleep(self.args.settle)
            return sum(guest.pss_kib() for guest in guests)
        finally:
            for guest in guests:
                guest.close()

    def idle(self) -> None:
        for name, (fpr, ksm) in CONFIGS.items():
            context = KsmRunning() if ksm else _Nothing()
            with context:
                log(f"idle {name}: pyvmm")
                ours = self.pyvmm_idle(fpr, ksm)
            theirs = None
            if not self.args.skip_qemu:
                with KsmRunning() if ksm else _Nothing():
                    log(f"idle {name}: QEMU")
                    theirs = self.qemu_idle(fpr, ksm)
            self.row(f"idle x{self.args.count}, {name}: total PSS", f"{ours / 1024:.0f} MiB",
                     None if theirs is None else f"{theirs / 1024:.0f} MiB",
                     None if theirs is None else f"{ours / theirs:.2f}x")

    # --- inflate ------------------------------------------------------------------------------

    def pyvmm_inflate(self) -> tuple[float | None, float | None, int]:
        from pyvmm.config import BalloonConfig

        vm = pyvmm_side.booted_vm(FILLED, balloon=BalloonConfig())
        try:
            base = _wait_grown(os.getpid())
            device = vm.devices["virtio-balloon"]
            target = (pyvmm_side.MEMORY_MIB // 2) << 8
            started = time.monotonic()
            device.set_target_pages(target)
            freed_at, full_at = _watch(os.getpid(), base, started,
                                       lambda: device.statistics()["actual_pages"] >= target)
            return freed_at, full_at, (base - rss_kib(os.getpid())) // 1024
        finally:
            vm.close()

    def qemu_inflate(self) -> tuple[float | None, float | None, int]:
        guest = qemu_guest(self.image, self.vmlinux, FILLED, self.qemu_extra, balloon=True, fpr=False,
                                 merge=False)
        try:
            guest.wait_booted(300)
            pid = guest.process.pid
            base = _wait_grown(pid)
            half = (qemu_side.MEMORY_MIB // 2) * MIB
            started = time.monotonic()
            guest.qmp.command("balloon", value=half)
            freed_at, full_at = _watch(pid, base, started, lambda: guest.qmp.command("query-balloon")["actual"] <= half)
            return freed_at, full_at, (base - rss_kib(pid)) // 1024
        finally:
            guest.close()

    def inflate(self) -> None:
        log("inflate: pyvmm")
        ours = _show_inflate(*self.pyvmm_inflate())
        theirs = None
        if not self.args.skip_qemu:
            log("inflate: QEMU")
            theirs = _show_inflate(*self.qemu_inflate())
        self.row("inflate of half (128 MiB): -100 MiB RSS / balloon full", ours, theirs, None)

    def row(self, name: str, ours: str, theirs: str | None, ratio: str | None) -> None:
        line = f"{name:<46} pyvmm: {ours}"
        if theirs is not None:
            line += f"   QEMU: {theirs}" + (f"   ({ratio})" if ratio else "")
        print(line, flush=True)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _wait_grown(pid: int, timeout: float = 300) -> int:
    """The process's RSS (KiB) once the guest's fill has made it stop growing."""
    deadline = time.monotonic() + timeout
    last, steady = rss_kib(pid), 0
    while steady < 6 and time.monotonic() < deadline:  # 3 s without growth
        time.sleep(0.5)
        now = rss_kib(pid)
        steady = steady + 1 if now <= last + 1024 else 0
        last = max(last, now)
    return last


def _watch(pid: int, base: int, started: float, full, timeout: float = 60) -> tuple[float | None, float | None]:
    """(seconds until RSS fell 100 MiB below `base`, seconds until `full()`), None if never."""
    freed_at = full_at = None
    deadline = started + timeout
    while (freed_at is None or full_at is None) and time.monotonic() < deadline:
        now = time.monotonic() - started
        if freed_at is None and base - rss_kib(pid) >= 100 * 1024:
            freed_at = now
        if full_at is None and full():
            full_at = now
        time.sleep(0.005)
    return freed_at, full_at


def _show_inflate(freed_at: float | None, full_at: float | None, dropped_mib: int) -> str:
    show = (lambda s: "never" if s is None else f"{s * 1000:.0f} ms")
    return f"{show(freed_at)} / {show(full_at)} (RSS -{dropped_mib} MiB)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=6, help="idle guests per configuration (default 6)")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds idle before PSS is read (default 30)")
    parser.add_argument("--rows", default="idle,inflate", help="idle,inflate")
    parser.add_argument("--skip-qemu", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not KSM.is_dir():
        print("memory_overcommit.py: needs root and a kernel with KSM", file=sys.stderr)
        return 2
    if not args.skip_qemu and shutil.which(qemu_side.QEMU) is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "qemu-system-x86"], check=True)
    bench = Bench(args)
    load = os.getloadavg()[0]
    print(f"memory_overcommit.py: {args.count} guests of {pyvmm_side.MEMORY_MIB} MiB, software CPU, "
          f"load average {load:.1f} at start", flush=True)
    for row in args.rows.split(","):
        getattr(bench, row.strip())()
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    shutil.rmtree(bench.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
