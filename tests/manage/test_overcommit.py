"""Memory overcommit, shown (issue 15 item 6): three default Linux guests of 256 MiB each run in
one memory cgroup whose limit (VMM processes included) is well below their 768 MiB of guest RAM.
In turns, each guest fills 160 MiB of its RAM with random data (nothing KSM could merge) and frees
it again; free page reporting hands the freed pages back to the host (each turn waits for it), KSM
merges what the guests share (their kernels, zeroed pages), so the cgroup never runs out: no OOM
kill, every guest still answers at the end. Without free page reporting each guest would keep the
pages it once touched: after three turns ~3 x 160 MiB more than the ~440 MiB the booted VMs take,
far past the limit (and the first turn's wait fails)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from helpers import host_memory
from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings

from test_balloon_managed import FILL, FILL_MIB, wait_until
from test_managed_vms import PROMPT, read_until

MIB = 1 << 20
GUESTS, GUEST_MIB = 3, 256
LIMIT_MIB = 700  # < GUESTS * GUEST_MIB, and the VMM processes (~90 MiB each here) count too
ROUNDS = 2


def _define(env, tmp_path, name: str, cid: int) -> None:
    values, _ = env
    definition = tmp_path / f"{name}.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = {GUEST_MIB}\nksm = true\n'
                          f'[vsock]\nguest_cid = {cid}\nuds_path = "{tmp_path / (name + ".vsock")}"\n'
                          f'[balloon]\namount_mib = 0\ndeflate_on_oom = true\nstats_polling_interval_s = 2\n'
                          f'free_page_reporting = true\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    subprocess.run([sys.executable, "-m", "pyvmm.cli", "define", str(definition)], env=values, check=True,
                   capture_output=True, timeout=120)


def _start_in(env, cgroup: host_memory.MemoryCgroup, name: str) -> None:
    """`pyvmm start NAME` from inside the cgroup: the VM's process is born there."""
    values, _ = env
    started = subprocess.run([sys.executable, "-m", "pyvmm.cli", "start", name], env=values, capture_output=True,
                             timeout=300, preexec_fn=cgroup.join)
    assert started.returncode == 0, started.stderr.decode(errors="replace")


def test_three_guests_overcommitted_in_a_memory_cgroup_keep_running(env, tmp_path):
    why = host_memory.available()
    if why is None and not host_memory.KSM_DIR.is_dir():
        why = "the host kernel has no KSM"
    if why is not None:
        pytest.skip(why)
    _, host = env
    names = [f"oc{i}" for i in range(GUESTS)]
    cgroup = host_memory.MemoryCgroup("pyvmm-overcommit", LIMIT_MIB * MIB)
    try:
        with host_memory.ksm_running():
            for index, name in enumerate(names):
                _define(env, tmp_path, name, 20 + index)
                _start_in(env, cgroup, name)
            vms = [host.vm(name) for name in names]
            for vm in vms:
                read_until(vm.open_console(), re.escape(PROMPT))
            assert sorted(cgroup.processes()) == sorted(vm.run.pid() for vm in vms)
            log = [f"booted: cgroup {cgroup.usage() / MIB:.0f} MiB of {LIMIT_MIB}"]

            for turn in range(ROUNDS * GUESTS):
                vm = vms[turn % GUESTS]
                filled = vm.exec(["sh", "-c", FILL])
                assert filled.status == 0, (turn, filled)
                # the guest freed FILL_MIB: free page reporting gives it back to the host
                wait_until(f"{vm.name} handing back its freed memory", lambda: vm.memory_stats()[
                    "guest_ram_resident_bytes"] < (GUEST_MIB - FILL_MIB // 2) * MIB, timeout=180)
                log.append(f"turn {turn} ({vm.name}): cgroup {cgroup.usage() / MIB:.0f} MiB")

            merged = wait_until("KSM merging the guests' pages", lambda: sum(
                vm.memory_stats()["ksm_merging_pages"] or 0 for vm in vms), timeout=180)
            log.append(f"KSM merged {merged} pages; peak {(cgroup.peak() or 0) / MIB:.0f} MiB")
            print("\n".join(log))

            assert cgroup.oom_kills() == 0, log
            for vm in vms:
                assert vm.info().state == "running", (vm.name, vm.info().outcome, log)
                assert vm.exec(["true"]).status == 0
                assert vm.stats()["devices"]["virtio-balloon"]["reported_bytes"] >= FILL_MIB // 2 * MIB
            assert GUESTS * GUEST_MIB > LIMIT_MIB >= (cgroup.peak() or 0) / MIB
            for vm in vms:
                warnings = find_kernel_warnings(vm.console_history())
                assert not warnings, describe(warnings)
    finally:
        for name in names:
            pid = host.vm(name).run.pid()
            if pid is not None:
                subprocess.run([sys.executable, "-m", "pyvmm.cli", "destroy", name], env=env[0], capture_output=True,
                               timeout=120)
        time.sleep(0.1)
        cgroup.close()
