"""Pause is a barrier, on both accelerators: when Vm.pause() returns no vCPU is in the guest,
the I/O thread holds still and guest time stands still; resume() continues from there."""

from __future__ import annotations

import threading
import time

from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig

LOAD = 0x100000
COUNTER = 0x300000
COUNT = bytes.fromhex("ff0500003000" "ebf8")  # 1: incl COUNTER; jmp 1b (32-bit protected mode)
PAUSED_FOR = 1.0


def _counting_vm(tmp_path, accel: str, cpus: int = 1):
    image = tmp_path / "count.bin"
    image.write_bytes(COUNT)
    config = MachineConfig(kernel=str(image), flat_address=LOAD, memory=16 << 20, cpus=cpus)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    vm.start()
    deadline = time.monotonic() + 20
    while vm.memory.read_u32(COUNTER) < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert vm.memory.read_u32(COUNTER) >= 1000, "the guest never started counting"
    return vm


def test_after_pause_the_guest_is_out_and_parked_then_resume_continues(tmp_path, accel):
    vm = _counting_vm(tmp_path, accel, cpus=2)  # vCPU 1 waits for a SIPI: it must park too
    try:
        vm.pause()
        paused_at = vm.memory.read_u32(COUNTER)  # no settling time: pause() is the barrier
        threads = [t for t in threading.enumerate() if t.name.startswith("vcpu")]
        assert threads and all(t.is_alive() for t in threads)
        assert vm.running_threads == len(threads) and vm.parked_threads == len(threads)
        time.sleep(0.3)
        assert vm.memory.read_u32(COUNTER) == paused_at
        vm.resume()
        deadline = time.monotonic() + 20
        while vm.memory.read_u32(COUNTER) == paused_at and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.memory.read_u32(COUNTER) > paused_at
        assert vm.parked_threads == 0 and not vm.stopped
    finally:
        vm.close()


def test_guest_time_does_not_advance_while_paused(tmp_path, accel):
    vm = _counting_vm(tmp_path, accel)
    try:
        vm.pause()
        frozen = vm.accel.guest_clock_ns()
        time.sleep(PAUSED_FOR)
        assert vm.accel.guest_clock_ns() - frozen < PAUSED_FOR * 1e9 / 2  # it stands still...
        vm.resume()
        after = vm.accel.guest_clock_ns()
        # ...and resumes where it stood: the time spent paused is not in the guest's clock
        assert 0 <= after - frozen < PAUSED_FOR * 1e9 / 2
    finally:
        vm.close()


def test_the_software_cpus_vcpus_keep_one_tsc_across_pauses(tmp_path):
    """Each pause freezes every vCPU's TSC and each resume sets them going again: from one host
    reading, or the vCPUs drift apart by the time between readings, pause after pause, until
    Linux finds a TSC warp when it brings a CPU online (as a hotplug test once did)."""
    from pyvmm.arch.x86_64 import msrs as M

    vm = _counting_vm(tmp_path, "tcg", cpus=2)
    try:
        for _ in range(20):
            vm.pause()
            vm.resume()
        vm.pause()
        first, second = (vcpu.save().msrs[M.MSR_IA32_TSC] for vcpu in vm.vcpus)
        assert first == second, f"the vCPUs' TSCs are {second - first} ticks apart"
    finally:
        vm.close()


def test_pause_waits_for_the_io_thread_work_item_in_flight(tmp_path, accel):
    vm = _counting_vm(tmp_path, accel)
    started, release, paused = threading.Event(), threading.Event(), threading.Event()
    finished = []

    def work_item() -> None:  # a device request the I/O thread is serving
        started.set()
        release.wait(20)
        finished.append(True)

    try:
        vm.iothread.call_soon(work_item)
        assert started.wait(20)
        pauser = threading.Thread(target=lambda: (vm.pause(), paused.set()))
        pauser.start()
        assert not paused.wait(0.5), "pause() returned while the I/O thread was still in a work item"
        release.set()
        assert paused.wait(20)
        assert finished == [True]
        ran_while_paused = threading.Event()
        vm.iothread.call_soon(ran_while_paused.set)  # queued: the paused thread must not run it
        assert not ran_while_paused.wait(0.3)
        vm.resume()
        assert ran_while_paused.wait(20)
        pauser.join()
    finally:
        release.set()
        vm.close()


def test_stop_while_paused_ends_the_vm(tmp_path, accel):
    from pyvmm.vm import VmOutcome

    vm = _counting_vm(tmp_path, accel)
    vm.pause()
    vm.request_stop(VmOutcome("quit", 0, "test"))
    vm.close()
    assert vm.outcome.reason == "quit"
    assert [t for t in threading.enumerate() if t.name.startswith("vcpu")] == []


def test_the_software_cpus_tsc_stands_still_while_paused(tmp_path):
    # Linux keeps time with the TSC: a TSC that ran on through a pause would make the guest's
    # clock jump by the pause when it resumes (KVM guests keep time with kvm-clock, frozen above)
    from pyvmm.arch.x86_64 import msrs as M

    vm = _counting_vm(tmp_path, "tcg")
    try:
        vm.pause()
        frozen = vm.vcpus[0].save().msrs[M.MSR_IA32_TSC]
        time.sleep(PAUSED_FOR)
        assert vm.vcpus[0].save().msrs[M.MSR_IA32_TSC] == frozen
        vm.resume()
        vm.pause()
        hz = vm.accel.platform.tsc_hz
        ran = vm.vcpus[0].save().msrs[M.MSR_IA32_TSC] - frozen
        assert 0 < ran < PAUSED_FOR * hz / 2  # it went on from where it stood, the pause left out
    finally:
        vm.close()
