"""pyvmm's side of the snapshot benchmarks (snapshot.py): the same default guest, software CPU.

The guest is booted in this process (runner.with_default_guest + build_vm, as `pyvmm run`
builds it) and counts as booted when its /init writes "init started" to port 0x610 (the
guest-notify device), as QEMU's does in qemu_side.py. What runs in another process (a
restore timed from process start, a migration's destination, clones, booted VMs for the
memory comparison) is a small Python program given on the command line, so each is a
pyvmm VMM process of its own, like each QEMU process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from qemu_side import pss_kib

MEMORY_MIB = 256


def booted_vm(command: list[str], *, timeout: float = 300, **machine_fields):
    """The default guest running `command` on the software CPU in this process, after /init.
    `machine_fields`: more MachineConfig fields (a balloon, ksm...)."""
    from pyvmm.accel.select import choose_accelerator
    from pyvmm.builder import build_vm
    from pyvmm.config import MachineConfig, RunOptions
    from pyvmm.runner import with_default_guest

    machine, _ = with_default_guest(MachineConfig(memory=MEMORY_MIB << 20, **machine_fields), RunOptions(), command)
    vm = build_vm(machine, lambda data: None, accel=choose_accelerator("tcg").create())
    vm.start()
    notify = vm.device_manager.device("guest-notify")
    deadline = time.monotonic() + timeout
    while notify.init_started_at is None:
        if vm.stopped or time.monotonic() > deadline:
            vm.close()
            raise RuntimeError(f"pyvmm did not boot the guest ({vm.outcome.message if vm.stopped else 'timed out'})")
        time.sleep(0.01)
    return vm


def _child(program: str, *args: str) -> subprocess.Popen:
    """A Python child running `program` with this repository's pyvmm; lines on its stdout."""
    src = str(Path(__file__).resolve().parent.parent / "src")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(program), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": src})


def _expect(child: subprocess.Popen, word: bytes, timeout: float = 300) -> bytes:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.startswith(word):
        child.kill()
        err = child.stderr.read().decode(errors="replace")[-800:] if child.stderr else ""
        raise RuntimeError(f"child said {line!r}, not {word!r}: {err}")
    return line


def _stop(child: subprocess.Popen) -> None:
    try:
        if child.stdin is not None:
            child.stdin.close()      # each child runs until its stdin closes
        child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


# --- snapshot and restore -----------------------------------------------------------------

def snapshot(command: list[str], state_path: Path, mem_path: Path) -> tuple[float, int, int]:
    """Boot, pause, save_snapshot: (seconds the save took, state + memory file size, data bytes)."""
    from pyvmm.snapshot import save_snapshot

    vm = booted_vm(command)
    try:
        time.sleep(0.5)     # the command is running
        vm.pause()
        started = time.monotonic()
        saved = save_snapshot(vm, state_path, mem_path)
        seconds = time.monotonic() - started
    finally:
        vm.close()
    return seconds, state_path.stat().st_size + mem_path.stat().st_size, saved.state_bytes + saved.memory_bytes


RESTORE_CHILD = """
    import sys, time
    started = time.monotonic()
    from pyvmm.snapshot import load_snapshot
    vm = load_snapshot(sys.argv[1], sys.argv[2], lambda data: None, mode=sys.argv[3])
    vm.resume()
    print("running", time.monotonic() - started, flush=True)
    sys.stdin.read()
    vm.close()
"""


def restore_in_process(state_path: Path, mem_path: Path, mode: str) -> float:
    """Seconds from load_snapshot() to a running VM, in this process (imports already done)."""
    from pyvmm.snapshot import load_snapshot

    started = time.monotonic()
    vm = load_snapshot(state_path, mem_path, lambda data: None, mode=mode)
    vm.resume()
    seconds = time.monotonic() - started
    vm.close()
    return seconds


def restore_process(state_path: Path, mem_path: Path, mode: str) -> tuple[float, float]:
    """(seconds from spawning a pyvmm process to its VM running, of which in load + resume)."""
    started = time.monotonic()
    child = _child(RESTORE_CHILD, str(state_path), str(mem_path), mode)
    line = _expect(child, b"running")
    total = time.monotonic() - started
    _stop(child)
    return total, float(line.split()[1])


# --- migration ----------------------------------------------------------------------------

DESTINATION_CHILD = """
    import sys
    from pyvmm.migration import IncomingListener
    with IncomingListener("unix:" + sys.argv[1]) as listener:
        print("listening", flush=True)
        incoming = listener.receive(lambda data: None)
    incoming.vm.resume()
    print("received", flush=True)
    sys.stdin.read()
    incoming.vm.close()
"""


def migrate(command: list[str], sock: Path, settle: float = 1.0):
    """Live-migrate the booted guest running `command` to a pyvmm destination process over a
    Unix socket: the migration's final MigrationProgress (total_s, downtime_ms, rounds...)."""
    from pyvmm.migration import MigrationOptions, migrate as migrate_vm

    vm = booted_vm(command)
    destination = _child(DESTINATION_CHILD, str(sock))
    try:
        _expect(destination, b"listening")
        time.sleep(settle)
        progress = migrate_vm(vm, f"unix:{sock}", MigrationOptions(downtime_ms=300))
        _expect(destination, b"received")
        return progress
    finally:
        vm.close()
        _stop(destination)


# --- memory of many VMs -------------------------------------------------------------------

BOOTED_CHILD = """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from pyvmm_side import booted_vm
    vm = booted_vm(sys.argv[2:])
    print("booted", flush=True)
    sys.stdin.read()
    vm.close()
"""

CLONE_CHILD = """
    import os, sys
    from pyvmm.clones import start_clone
    vm, _ = start_clone(sys.argv[1], sys.argv[2], f"clone{os.getpid()}", os.path.dirname(sys.argv[1]), lambda data: None)
    vm.resume()
    print("running", flush=True)
    sys.stdin.read()
    vm.close()
"""


ZYGOTE_CHILD = """
    import os, sys
    from pyvmm.clones import start_clone
    import pyvmm.snapshot, pyvmm.identity, pyvmm.restore, pyvmm.accel.tcg.accelerator, pyvmm.accel.tcg.translator
    from pyvmm.accel.tcg.host_tsc import host_tsc_hz
    host_tsc_hz()
    for _ in range(int(sys.argv[3])):
        if os.fork() == 0:      # no thread exists yet in this process: forking is safe
            vm, _ = start_clone(sys.argv[1], sys.argv[2], f"clone{os.getpid()}", os.path.dirname(sys.argv[1]),
                                lambda data: None)
            vm.resume()
            print("running", os.getpid(), flush=True)
            sys.stdin.read()
            vm.close()
            os._exit(0)
    sys.stdin.read()
    for _ in range(int(sys.argv[3])):
        os.wait()
"""


def many_pss(children: list[subprocess.Popen], word: bytes, settle: float = 2.0) -> int:
    """Total PSS (KiB) of `children` once each has said `word` and they have run `settle` s."""
    try:
        for child in children:
            _expect(child, word)
        time.sleep(settle)
        return sum(pss_kib(child.pid) for child in children)
    finally:
        for child in children:
            _stop(child)


def booted_memory(command: list[str], count: int) -> int:
    here = str(Path(__file__).resolve().parent)
    return many_pss([_child(BOOTED_CHILD, here, *command) for _ in range(count)], b"booted")


def clones_memory_zygote(state_path: Path, mem_path: Path, count: int, settle: float = 2.0) -> int:
    """Total PSS (KiB) of `count` clones forked from one zygote process that imported pyvmm
    (its interpreter and modules shared copy-on-write), the zygote included."""
    zygote = _child(ZYGOTE_CHILD, str(state_path), str(mem_path), str(count))
    try:
        pids = [int(_expect(zygote, b"running").split()[1]) for _ in range(count)]
        time.sleep(settle)
        return pss_kib(zygote.pid) + sum(pss_kib(pid) for pid in pids)
    finally:
        _stop(zygote)


def clones_memory(state_path: Path, mem_path: Path, count: int) -> int:
    return many_pss([_child(CLONE_CHILD, str(state_path), str(mem_path)) for _ in range(count)], b"running")
