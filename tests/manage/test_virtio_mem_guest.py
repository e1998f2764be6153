"""virtio-mem with the default Linux guest (issue 15 item 5), as a managed VM: `pyvmm mem
resize` grows the guest's memory by plugging 2 MiB blocks (Linux's virtio_mem driver adds and
onlines memory blocks: MemTotal grows), then shrinks it (blocks unplugged: MemTotal falls back,
the host's resident memory for the region drops); the API, the client and bad input too."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings
from pyvmm.manage.client import ApiError

from test_managed_vms import PROMPT, cli, read_until

MiB = 1 << 20


def _memtotal_kib(conn, marker: str) -> int:
    conn.sendall(f"echo {marker} $(grep MemTotal /proc/meminfo)\n".encode())
    text = read_until(conn, rf"{marker} MemTotal: +\d+ kB".encode()).decode(errors="replace")
    return int(re.search(rf"{marker} MemTotal: +(\d+) kB", text).group(1))


def _wait_plugged(vm, mib: int) -> dict:
    deadline = time.monotonic() + 120
    while (status := vm.virtio_mem())["plugged_size_mib"] != mib:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def test_the_guest_grows_and_shrinks_through_pyvmm_mem_resize(env, tmp_path):
    values, host = env
    definition = tmp_path / "elastic.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\nvirtio_mem_mib = 512\n')
    cli(env, "define", str(definition))
    cli(env, "start", "elastic")
    vm = host.vm("elastic")
    conn = vm.open_console()
    read_until(conn, re.escape(PROMPT))
    status = vm.virtio_mem()
    assert (status["region_size_mib"], status["block_size_mib"], status["plugged_size_mib"]) == (512, 2, 0)
    before = _memtotal_kib(conn, "m0")

    grown = subprocess.run([sys.executable, "-m", "pyvmm.cli", "mem", "resize", "elastic", "256M", "--wait", "120"],
                           capture_output=True, text=True, env=values, timeout=300)
    assert grown.returncode == 0, grown.stderr
    assert grown.stdout.startswith("virtio-mem: 256 MiB plugged, 256 MiB requested (region 512 MiB at 0x")
    assert _memtotal_kib(conn, "m1") - before == 256 * 1024  # two 128 MiB memory blocks, online

    vm.resize_memory(64)  # the client: give most of it back
    _wait_plugged(vm, 64)
    deadline = time.monotonic() + 120
    while (after := _memtotal_kib(conn, f"m{int(time.monotonic())}")) != before + 64 * 1024:
        assert time.monotonic() < deadline, (before, after)  # unplugged memory blocks go offline, then away
        time.sleep(1)
    stats = vm.stats()["devices"]["virtio-mem"]
    assert stats["unplugged_blocks"] >= 96 and stats["plugged_size"] == 64 * MiB

    for size, message in ((600, "requested_size_mib must be 0-512 MiB in whole 2 MiB blocks (got 600)"),
                          (3, "requested_size_mib must be 0-512 MiB in whole 2 MiB blocks (got 3)")):
        try:
            vm.resize_memory(size)
        except ApiError as exc:
            assert (exc.status, exc.fault_message) == (400, message)
        else:
            raise AssertionError("accepted")
    bad = subprocess.run([sys.executable, "-m", "pyvmm.cli", "mem", "resize", "elastic", "lots"],
                         capture_output=True, text=True, env=values, timeout=60)
    assert (bad.returncode, bad.stderr) == (2, "pyvmm: error: SIZE: 'lots' is not a size (e.g. 512M, 2G)\n")

    # a snapshot carries the plugged blocks and their contents: the restored guest has them
    conn.sendall(b"echo kept > /dev/shm/x; echo saved\n")
    read_until(conn, rb"\nsaved")
    conn.close()
    history = vm.console_history()
    cli(env, "save", "elastic", str(tmp_path / "elastic.state"))
    cli(env, "restore", str(tmp_path / "elastic.state"), "--name", "again")
    again = host.vm("again")
    assert again.virtio_mem()["plugged_size_mib"] == 64 and again.virtio_mem()["requested_size_mib"] == 64
    conn = again.open_console()
    assert _memtotal_kib(conn, "m9") == before + 64 * 1024
    again.resize_memory(128)  # the restored driver goes on plugging
    _wait_plugged(again, 128)
    conn.sendall(b"cat /dev/shm/x\n")
    read_until(conn, rb"\nkept")
    cli(env, "shutdown", "again", "--timeout", "300")
    warnings = find_kernel_warnings(history + again.console_history())
    assert not warnings, describe(warnings)
