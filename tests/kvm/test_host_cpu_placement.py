"""In a VM process a software-CPU VM's threads run on one host CPU (host/cpu_affinity.py); a KVM
VM's are left where the kernel puts them, and so are a library user's (the test suite's own)."""

from __future__ import annotations

import os
import threading

import pytest

from pyvmm.host import cpu_affinity

from test_pause import _counting_vm  # (tests/kvm is on the path: pytest prepends it)

ALLOWED = os.sched_getaffinity(0)


@pytest.mark.skipif(len(ALLOWED) < 2, reason="placing threads needs two host CPUs to choose from")
def test_the_vm_threads_share_one_host_cpu_on_the_software_cpu_only(tmp_path, accel, monkeypatch):
    monkeypatch.delenv(cpu_affinity.ENV, raising=False)
    monkeypatch.setattr(cpu_affinity, "_vm_process", True)  # as a VM process's entry point sets it
    vm = _counting_vm(tmp_path, accel)
    try:
        io_thread = next(t for t in threading.enumerate() if t.name == vm.iothread.name)
        tids = [io_thread.native_id, *vm.run_loop_threads.values()]
        placements = [os.sched_getaffinity(tid) for tid in tids]
        if accel == "tcg":
            assert len(placements[0]) == 1 and all(p == placements[0] for p in placements), placements
            assert placements[0] <= ALLOWED
        else:
            assert all(p == ALLOWED for p in placements), placements
        assert os.sched_getaffinity(0) == ALLOWED  # the caller's own thread is left alone
    finally:
        vm.close()


@pytest.mark.parametrize("setting, vm_process", [("any", True), (None, False)], ids=["any", "library-use"])
def test_the_software_cpu_threads_stay_unplaced_with_any_or_in_library_use(tmp_path, monkeypatch, setting,
                                                                            vm_process):
    if setting is None:
        monkeypatch.delenv(cpu_affinity.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_affinity.ENV, setting)
    monkeypatch.setattr(cpu_affinity, "_vm_process", vm_process)
    vm = _counting_vm(tmp_path, "tcg")
    try:
        assert all(os.sched_getaffinity(tid) == ALLOWED for tid in vm.run_loop_threads.values())
    finally:
        vm.close()
