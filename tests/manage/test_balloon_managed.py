"""The balloon with the default Debian guest in a managed VM (software CPU here): `pyvmm setmem`
inflates it and the host's resident memory for the VM falls; the guest's statistics reach
`pyvmm mem stats`/domstats and GET /balloon/statistics; a snapshot keeps the inflated pages
as holes; deflating gives the guest its memory back; bad targets are one line (exit 2 / 400)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings
from pyvmm.manage.client import ApiError
from pyvmm.snapshot.memory_file import data_ranges

from test_managed_vms import PROMPT, cli, read_until

MIB = 1 << 20
FILL_MIB = 160
# files in the guest's two RAM file systems (each is capped at half of RAM), then removed
FILL = (f"dd if=/dev/urandom of=/fill bs=1M count={FILL_MIB // 2} 2>&1 && "
        f"dd if=/dev/urandom of=/dev/fill bs=1M count={FILL_MIB // 2} 2>&1 && rm /fill /dev/fill")


def pyvmm(env, *args: str) -> subprocess.CompletedProcess:
    values, _ = env
    return subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, env=values, timeout=300)


def wait_until(what: str, check, timeout: float = 240.0):
    """Poll `check()` until it returns something true; fail naming `what` (and the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: still not so after {timeout} s"
        time.sleep(0.5)


def define_balloon_vm(env, tmp_path, name: str, balloon: str) -> object:
    _, host = env
    definition = tmp_path / f"{name}.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                          f'[vsock]\nguest_cid = 9\nuds_path = "{tmp_path / (name + ".vsock")}"\n'
                          f'[balloon]\n{balloon}\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", name)
    vm = host.vm(name)
    read_until(vm.open_console(), re.escape(PROMPT))
    return vm


def test_setmem_inflates_the_balloon_and_the_host_gets_the_memory_back(env, tmp_path):
    vm = define_balloon_vm(env, tmp_path, "bal", "amount_mib = 0\ndeflate_on_oom = false\nstats_polling_interval_s = 1")
    # the guest touches FILL_MIB of its RAM and frees it again: resident on the host, free in the guest
    fill = FILL
    filled = vm.exec(["sh", "-c", fill])
    assert filled.status == 0, filled
    before = vm.memory_stats()["guest_ram_resident_bytes"]
    assert before >= FILL_MIB * MIB, before
    total_before = _mem_total_kib(vm)

    # statistics from the guest, in domstats and the API
    stats = wait_until("guest statistics", lambda: (s := vm.memory_stats())["guest_free_bytes"] and s)
    assert 0 < stats["guest_free_bytes"] <= stats["guest_total_bytes"] <= 256 * MIB
    assert stats["guest_available_bytes"] is not None and stats["guest_cached_bytes"] is not None
    shown = cli(env, "mem", "stats", "bal").stdout.decode()
    assert re.search(r"guest_free_bytes:\s+\d+\.\d MiB", shown), shown

    # virsh's verb: the guest keeps 96 MiB, the balloon takes the rest
    out = cli(env, "setmem", "bal", "96M").stdout.decode()
    assert "balloon target 160 MiB" in out
    target = 256 - 96
    wait_until("the balloon reaching its target", lambda: vm.balloon_statistics()["actual_mib"] == target)
    after = vm.memory_stats()["guest_ram_resident_bytes"]
    assert before - after >= (target - 40) * MIB, (before, after)   # the pages left the host
    assert total_before - _mem_total_kib(vm) >= (target - 1) * 1024    # and the guest
    statistics = vm.balloon_statistics()
    assert (statistics["target_mib"], statistics["target_pages"]) == (target, target * 256)
    assert vm.balloon()["amount_mib"] == target
    assert vm.stats()["devices"]["virtio-balloon"]["inflate_freed_bytes"] >= (target - 40) * MIB

    # a snapshot keeps the inflated pages as holes
    state = tmp_path / "bal.state"
    vm.snapshot(state)
    fd = os.open(f"{state}.mem", os.O_RDONLY)
    try:
        data = sum(end - start for start, end in data_ranges(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)
    assert data <= (256 - target + 40) * MIB, data

    # bad targets: one line, exit 2 / 400, nothing changes
    for size, message in (("300M", "more than the guest's 256 MiB"), ("-5M", "invalid size")):
        bad = pyvmm(env, "setmem", "bal", size)
        assert bad.returncode == 2 and message.encode() in bad.stderr, bad.stderr
        assert bad.stderr.count(b"\n") == 1 and b"Traceback" not in bad.stderr
    with pytest.raises(ApiError) as refused:
        vm.set_balloon(257)
    assert refused.value.status == 400 and "amount_mib" in refused.value.fault_message
    assert vm.balloon_statistics()["target_mib"] == target

    # deflate: the guest has its memory back and can use it
    cli(env, "setmem", "bal", "256M")
    wait_until("the balloon deflating", lambda: vm.balloon_statistics()["actual_mib"] == 0)
    assert _mem_total_kib(vm) == total_before
    assert vm.exec(["sh", "-c", fill]).status == 0

    cli(env, "destroy", "bal")
    warnings = find_kernel_warnings(vm.console_history())
    assert not warnings, describe(warnings)


def _mem_total_kib(vm) -> int:
    meminfo = vm.read_file("/proc/meminfo").decode()
    return int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1))


def test_deflate_on_oom_gives_the_guest_its_ballooned_memory_when_it_runs_out(env, tmp_path):
    vm = define_balloon_vm(env, tmp_path, "oom", "amount_mib = 180\ndeflate_on_oom = true\nstats_polling_interval_s = 1")
    wait_until("the balloon reaching its target", lambda: vm.balloon_statistics()["actual_mib"] == 180)
    # ~40 MiB left free: 100 MiB more is only there if the balloon gives it back
    grow = vm.exec(["sh", "-c", "dd if=/dev/urandom of=/dev/grow bs=1M count=100 2>&1; echo status=$?; "
                                "dmesg | grep -c 'Out of memory' || true"])
    assert b"status=0" in grow.stdout, grow
    assert grow.stdout.rstrip().endswith(b"\n0"), grow.stdout  # the guest's OOM killer never ran
    statistics = vm.balloon_statistics()
    assert statistics["target_mib"] == 180 and statistics["actual_mib"] <= 180 - 50, statistics
    cli(env, "destroy", "oom")
    warnings = find_kernel_warnings(vm.console_history())
    assert not warnings, describe(warnings)
