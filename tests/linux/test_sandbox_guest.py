"""pyvmm.Sandbox and `pyvmm run -- CMD` from the warm snapshot (the default guest, software CPU).

The warm snapshot is made on first use (the default guest booted until its agent answers).
Every guest started from it has its own identity; a sandbox runs commands and copies files
through the agent, times out a command by killing it, and leaves nothing behind when it is
closed. `pyvmm run -- CMD` starts from the snapshot by default and streams the command's
output with its exit status; options for another machine keep the cold boot.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

import pyvmm
from pyvmm.accel.select import choose_accelerator
from helpers.linux_guest import warm_run
from pyvmm.images.kernel_warnings import describe, find_kernel_warnings
from pyvmm.sandbox import RunResult, Sandbox, SandboxError, SandboxTimeout, warm


def gate(console: bytes) -> None:
    warnings = find_kernel_warnings(console, ())
    assert not warnings, describe(warnings)


@pytest.fixture(scope="module")
def warm_snapshot(image):
    """The warm snapshot (made here if there is none); the boot it was made from is gated."""
    snapshot = warm.warm_snapshot(choose_accelerator("auto"))
    gate((snapshot.directory / warm.BOOT_LOG).read_bytes())
    return snapshot


def _resources() -> tuple[set[str], int, set[int]]:
    """This process's open files (by what they point to), thread count and child processes."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    children = set()
    for task in os.listdir("/proc/self/task"):
        try:
            children |= {int(pid) for pid in open(f"/proc/self/task/{task}/children").read().split()}
        except OSError:
            pass
    return fds, threading.active_count(), children


class ConsoleGate:
    """The sandbox guest's console, gated like every Linux boot's (kernel warnings fail)."""

    def __init__(self):
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk

    def check(self):
        gate(bytes(self.data))


def test_sandbox_runs_commands_copies_files_times_out_and_leaves_nothing(warm_snapshot):
    with Sandbox() as warmup:        # the first one in this process imports what every one uses
        assert warmup.run("true").ok
    before = _resources()
    console = ConsoleGate()
    with Sandbox(console=console) as sb:
        assert sb.started_from == "snapshot" and sb.running
        result = sb.run("echo out; echo err >&2; exit 3")
        assert result == RunResult(b"out\n", b"err\n", 3)
        assert sb.run(["cat"], stdin="piped").stdout == b"piped"
        assert sb.run('echo "$A" $(pwd)', env={"A": "x"}, cwd="/tmp").text == "x /tmp\n"
        sb.files.write("/tmp/blob", b"\x00\x01" * 70_000)
        assert sb.files.read("/tmp/blob") == b"\x00\x01" * 70_000
        assert sb.run("wc -c < /tmp/blob").text.strip() == "140000"
        with pytest.raises(SandboxError, match="No such file"):
            sb.files.read("/nowhere")
        with pytest.raises(SandboxError, match="^exec no-such-program: No such file or directory$"):
            sb.run(["no-such-program"])
        started = time.monotonic()
        with pytest.raises(SandboxTimeout, match="sleep 600.*timed out after 2 s"):
            sb.run(["sleep", "600"], timeout=2)
        assert time.monotonic() - started < 60
        assert "sleep 600" not in sb.run("ps").text          # killed in the guest
        clock = int(sb.run("date +%s").text)
        assert abs(clock - time.time()) < 30                 # the host's time, not the snapshot's
    assert not sb.running
    with pytest.raises(SandboxError, match="closed"):
        sb.run("true")
    console.check()
    assert _resources() == before, "the sandbox left files, threads or processes behind"


def test_sandboxes_are_not_twins_and_kill_stops_one(warm_snapshot):
    with Sandbox() as first, Sandbox() as second:
        ids = [sb.files.read("/etc/machine-id") for sb in (first, second)]
        randoms = [sb.run(["head", "-c", "16", "/dev/urandom"]).stdout for sb in (first, second)]
        assert ids[0] != ids[1] and randoms[0] != randoms[1]
        cids = {sb._guest.vm.device_manager.device("virtio-vsock").guest_cid for sb in (first, second)}
        assert len(cids) == 2 and warm.WARM_CID not in cids
        first.kill()
        assert not first.running
        with pytest.raises(SandboxError, match="closed"):
            first.run("true")
        assert second.run("echo alive").text == "alive\n"      # the other one runs on


def test_a_sandbox_can_boot_instead(image):
    console = ConsoleGate()
    with Sandbox(warm=False, console=console) as sb:
        assert sb.started_from == "boot"
        assert sb.run("cat /proc/cmdline").text.count("pyvmm.cmd=") == 1
    console.check()


def test_a_broken_warm_snapshot_is_made_again_with_a_warning(warm_snapshot, tmp_path, monkeypatch, caplog):
    source = warm_snapshot           # a good one, copied aside and broken there
    copy = tmp_path / "warm"
    (copy / source.key).mkdir(parents=True)
    for name in (warm.STATE_FILE, warm.MEMORY_FILE, warm.META_FILE):
        (copy / source.key / name).write_bytes((source.directory / name).read_bytes())
    state = copy / source.key / warm.STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF                              # same size: only the checksum sees it
    state.write_bytes(bytes(data))
    monkeypatch.setattr(warm, "warm_root", lambda: copy)
    with caplog.at_level(logging.WARNING, logger="pyvmm.sandbox"):
        with Sandbox() as sb:
            assert sb.run("echo fine").text == "fine\n"
    assert any("cannot be loaded" in r.getMessage() and "making it again" in r.getMessage() for r in caplog.records)
    assert state.read_bytes() != bytes(data)                  # replaced by a good one
    gate((copy / source.key / warm.BOOT_LOG).read_bytes())


def test_pyvmm_run_starts_from_the_warm_snapshot_and_cold_stays_reachable(warm_snapshot, pyvmm, tmp_path):
    log = tmp_path / "console.log"
    result = warm_run("--", "sh", "-c", "echo from-the-guest; echo oops >&2; exit 5", log=log)
    assert result.returncode == 5, result.stderr
    assert result.stdout == "from-the-guest\n" and result.stderr == "oops\n"
    missing = warm_run("--", "no-such-program", log=log)
    assert missing.returncode == 127 and missing.stderr == "pyvmm: exec no-such-program: No such file or directory\n"
    piped = warm_run("--", "sh", "-c", "tr a-z A-Z", log=log, input="from the host")
    assert (piped.returncode, piped.stdout) == (0, "FROM THE HOST")
    timed = warm_run("--timeout", "3", "--", "sleep", "600", log=log)
    assert timed.returncode == 124 and "--timeout 3 s: killed" in timed.stderr
    cold = pyvmm("run", "--cold", "--", "sh", "-c", "echo cold-boot")
    assert cold.returncode == 0 and "cold-boot" in cold.stdout and "pyvmm: exit status 0" in cold.stdout
    log.unlink()
    refused = warm_run("--warm", "--memory", "512M", "--", "true", log=log)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "pyvmm: error: --warm: --memory asks for another machine than the warm snapshot's"
