"""Live migration between managed VMs, through the CLI and the Python client, on a tiny guest
(guests/ticker.S prints every tick, numbered, on its serial console): the source's console
and then the destination's show every tick once, in order, whatever happened in between —
a migration that completed, one whose destination was killed halfway, one cancelled."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers.managed import managed_env

from helpers.reporting import KVM_GUESTS
from pyvmm.guests import build_source
from pyvmm.manage.client import MigrationFailed
from pyvmm.manage.launch import wait_exit


@pytest.fixture
def env(tmp_path):
    """No default image: these VMs are tiny test guests."""
    yield from managed_env(tmp_path)

def cli(env, *args: str, status: int = 0) -> subprocess.CompletedProcess:
    values, _ = env
    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, env=values, timeout=60,
                            text=True)
    assert result.returncode == status, (args, result.stdout, result.stderr)
    return result


def define_pair(env, memory_mib: int = 16) -> None:
    """Two VMs with the same definition: the ticker on the software CPU."""
    _, host = env
    document = {"machine-config": {"vcpu_count": 1, "mem_size_mib": memory_mib},
                "boot-source": {"kernel_image_path": str(build_source(KVM_GUESTS / "ticker.S", 64))},
                "pyvmm": {"accel": "tcg"}}
    host.define(document, "src")
    host.define(document, "dst")


def ticks(console: bytes) -> list[int]:
    return [int(n, 16) for n in re.findall(rb"tick ([0-9a-f]{16})\n", console)]


def wait_ticks(vm, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(seen := ticks(vm.console_history())) < count:
        assert time.monotonic() < deadline, f"{vm.name} printed {len(seen)} ticks"
        time.sleep(0.05)
    return seen


def assert_every_tick_once(*consoles: bytes) -> None:
    joined = b"".join(consoles)
    assert b"BROKEN" not in joined
    seen = ticks(joined)
    assert seen == list(range(1, len(seen) + 1)), "ticks lost or repeated"


def test_migrate_through_the_cli_and_the_ticks_go_on(env, tmp_path):
    _, host = env
    define_pair(env)
    address = f"unix:{tmp_path / 'mig.sock'}"
    started = cli(env, "start", "dst", "--incoming", address)
    assert "waits for a migration at" in started.stdout
    assert re.search(r"dst\s+incoming", cli(env, "list").stdout)
    cli(env, "start", "src")
    src, dst = host.vm("src"), host.vm("dst")
    wait_ticks(src, 20)
    result = cli(env, "migrate", "src", address, "--downtime-ms", "300")
    assert re.search(r"Domain 'src' migrated to unix:.*downtime \d+ ms", result.stdout), result.stdout
    assert src.state() == "migrated" and src.info().outcome["reason"] == "migrated"
    final = src.migration_progress()
    assert final["status"] == "completed" and final["downtime_ms"] is not None
    before = src.console_history()
    assert dst.state() == "running"
    assert len(wait_ticks(dst, 20)) >= 20
    assert_every_tick_once(before, dst.console_history())
    unfinished = before[before.rfind(b"\n") + 1:]   # a tick line the source began, the destination ends
    assert ticks(unfinished + dst.console_history())[0] <= ticks(before)[-1] + 1   # it goes on from there
    cli(env, "destroy", "dst")


def test_a_destination_killed_halfway_leaves_the_source_running(env, tmp_path):
    _, host = env
    define_pair(env)
    address = f"unix:{tmp_path / 'mig.sock'}"
    host.vm("dst").start(incoming=address)
    host.vm("src").start()
    src, dst = host.vm("src"), host.vm("dst")
    wait_ticks(src, 10)
    src.migrate(address, bandwidth=8192, wait=False)       # slow: a few seconds for the ticker's pages
    deadline = time.monotonic() + 30
    while src.migration_progress()["bytes_sent"] < 8192:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(dst.run.pid(), signal.SIGKILL)
    with pytest.raises(MigrationFailed, match="src: the migration stream to unix:.* broke|stalled|ended"):
        src.wait_migration()
    assert src.state() == "running"
    count = len(ticks(src.console_history()))
    wait_ticks(src, count + 10)
    assert_every_tick_once(src.console_history())


def test_cancel_through_the_cli_leaves_the_source_running_and_the_destination_gone(env, tmp_path):
    _, host = env
    define_pair(env)
    address = f"unix:{tmp_path / 'mig.sock'}"
    cli(env, "start", "dst", "--incoming", address)
    cli(env, "start", "src")
    src, dst = host.vm("src"), host.vm("dst")
    wait_ticks(src, 10)
    values, _ = env
    migrating = subprocess.Popen([sys.executable, "-m", "pyvmm.cli", "migrate", "src", address, "--bandwidth", "8K"],
                                 env=values, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            if src.migration_progress()["status"] == "precopy" or src.migration_progress()["bytes_sent"] > 4096:
                break
        except Exception:  # noqa: BLE001 - not started yet
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cli(env, "migrate-cancel", "src")
    out, err = migrating.communicate(timeout=60)
    assert migrating.returncode == 2, (out, err)
    assert err.strip().splitlines()[-1] == "pyvmm: error: src: the migration was cancelled: the VM runs on here"
    assert src.state() == "running"
    assert wait_exit(dst.run.recorded_pid(), 30)
    outcome = dst.info().outcome
    assert outcome["reason"] == "failed" and "cancelled" in outcome["message"]
    count = len(ticks(src.console_history()))
    wait_ticks(src, count + 10)
    assert_every_tick_once(src.console_history())
