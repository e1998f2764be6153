"""Vm's dirty log on both accelerators: a tiny guest writes the pages the host names, and the
log reports exactly those (and the control page the host and the guest write), nothing else;
each dirty_log() starts over; readers keep their own logs."""

from __future__ import annotations

import time

import pytest

from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.memory.dirty import SNAPSHOT_READER, DirtyTrackingUnavailable, host_tracking_problem
from pyvmm.vm import VmError

pytestmark = pytest.mark.skipif(host_tracking_problem() is not None, reason=f"{host_tracking_problem()}")

LOAD = 0x100000
CONTROL = 0x200000  # u32 command (a sequence number), u32 acknowledged, u32 count, u32 addresses...
# 32-bit protected mode, no stack: spin reading CONTROL until the command differs from the
# acknowledgement, store the command's number at each address listed, acknowledge.
WRITER = bytes.fromhex(
    "a100002000"      # spin: mov CONTROL, %eax
    "3b0504002000"    #       cmp CONTROL+4, %eax
    "74f3"            #       je spin
    "8b0d08002000"    #       mov CONTROL+8, %ecx
    "be10002000"      #       mov $CONTROL+16, %esi
    "85c9"            # next: test %ecx, %ecx
    "740a"            #       jz done
    "8b3e"            #       mov (%esi), %edi
    "8907"            #       mov %eax, (%edi)
    "83c604"          #       add $4, %esi
    "49"              #       dec %ecx
    "ebf2"            #       jmp next
    "a304002000"      # done: mov %eax, CONTROL+4
    "ebd3")           #       jmp spin


class WriterGuest:
    def __init__(self, tmp_path, accel: str) -> None:
        image = tmp_path / "writer.bin"
        image.write_bytes(WRITER)
        config = MachineConfig(kernel=str(image), flat_address=LOAD, memory=16 << 20)
        self.vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
        self.memory = self.vm.memory
        self.command = 0
        self.vm.start()

    def write(self, addresses: list[int]) -> None:
        """Have the guest store into each of `addresses`; returns once it has."""
        self.command += 1
        self.memory.write_u32(CONTROL + 8, len(addresses))
        for index, address in enumerate(addresses):
            self.memory.write_u32(CONTROL + 16 + 4 * index, address)
        self.memory.write_u32(CONTROL, self.command)
        deadline = time.monotonic() + 60
        while self.memory.read_u32(CONTROL + 4) != self.command:
            assert time.monotonic() < deadline, "the guest never acknowledged"
            assert not self.vm.stopped, self.vm.outcome
            time.sleep(0.005)
        for address in addresses:
            assert self.memory.read_u32(address) == self.command


@pytest.fixture
def writer(tmp_path, accel):
    guest = WriterGuest(tmp_path, accel)
    try:
        guest.write([0x400000])  # running, before the log starts
        yield guest
    finally:
        guest.vm.close()


def pages(*addresses: int) -> list[int]:
    return sorted({address & ~0xFFF for address in addresses})


def test_the_log_holds_exactly_the_pages_written_and_starts_over(writer):
    vm = writer.vm
    vm.start_dirty_log()
    first = [0x300000, 0x300FFC, 0x500010, 0xFFF000]   # two on one page, the last page of RAM
    writer.write(first)
    assert list(vm.dirty_log().pages()) == pages(CONTROL, *first)
    time.sleep(0.2)  # the guest spins, reading only
    assert list(vm.dirty_log().pages()) == []
    second = [0x600000, 0x0, 0x7000]  # page 0, and a page below the code
    writer.write(second)
    assert list(vm.dirty_log().pages()) == pages(CONTROL, *second)
    vm.stop_dirty_log()
    with pytest.raises(VmError, match="not running"):
        vm.dirty_log()


def test_the_log_is_collected_while_paused_too_and_restarts(writer):
    vm = writer.vm
    vm.start_dirty_log()
    writer.write([0x310000])
    vm.pause()
    try:
        assert list(vm.dirty_log().pages()) == pages(CONTROL, 0x310000)
        assert list(vm.dirty_log().pages()) == []
    finally:
        vm.resume()
    vm.stop_dirty_log()
    writer.write([0x320000])  # not logged
    vm.start_dirty_log()
    writer.write([0x330000])
    assert list(vm.dirty_log().pages()) == pages(CONTROL, 0x330000)


def test_readers_keep_their_own_logs(writer):
    vm = writer.vm
    vm.start_dirty_log()
    writer.write([0x340000])
    vm.start_dirty_log("migration")  # starts now: 0x340000 is not its
    vm.start_dirty_log()             # already logging: keeps its log
    writer.write([0x350000])
    assert list(vm.dirty_log("migration").pages()) == pages(CONTROL, 0x350000)
    writer.write([0x360000])
    assert list(vm.dirty_log().pages()) == pages(CONTROL, 0x340000, 0x350000, 0x360000)
    assert list(vm.dirty_log("migration").pages()) == pages(CONTROL, 0x360000)
    vm.stop_dirty_log()
    assert vm.dirty_logging  # the migration still reads
    writer.write([0x370000])
    assert list(vm.dirty_log("migration").pages()) == pages(CONTROL, 0x370000)
    vm.stop_dirty_log("migration")
    assert not vm.dirty_logging


def test_the_dirty_rate_follows_the_logs(writer):
    vm = writer.vm
    vm.start_dirty_log()
    assert vm.dirty_rate() is None
    writer.write([0x380000 + page * 0x1000 for page in range(8)])
    vm.dirty_log()
    assert vm.dirty_rate() > 0


def test_a_vhost_user_device_is_refused_with_one_line(writer):
    vm = writer.vm
    assert vm.device_manager is not None
    vm.device_manager.add("disk9", "vhost-user-blk", transport="none")
    with pytest.raises(DirtyTrackingUnavailable) as caught:
        vm.start_dirty_log()
    assert "\n" not in str(caught.value) and "disk9" in str(caught.value) and "another process" in str(caught.value)
    assert not vm.dirty_logging


@pytest.mark.parametrize("track", [True, False])
def test_machine_config_track_dirty_pages_logs_from_instance_start(guest, accel, track):
    from pyvmm.api.instance import VmInstance

    instance = VmInstance("dirty")
    instance.put_machine_config({"vcpu_count": 1, "mem_size_mib": 32, "track_dirty_pages": track})
    instance.put_boot_source({"kernel_image_path": guest("echo")})
    instance.spec.pyvmm["accel"] = accel
    instance.action({"action_type": "InstanceStart"})
    try:
        vm = instance.vm
        assert vm is not None and vm.dirty_logging is track
        if track:  # the guest's first instructions already wrote (its stack, as it printed)
            deadline = time.monotonic() + 60
            while b"echo: ready" not in instance.console.history() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert b"echo: ready" in instance.console.history()
            assert vm.dirty_log(SNAPSHOT_READER).count() > 0
    finally:
        instance.stop()


def test_the_benchmark_guest_dirties_exactly_its_area_and_its_pass_counter(guest, accel):
    """benchmarks/dirty_tracking.py's guest: mib=1 stride=4096 stores into the 256 pages at
    16 MiB pass after pass and counts its passes in the page below."""
    area, passes = 0x1000000, 0x1000000 - 0x1000
    config = MachineConfig(kernel=guest("dirtier"), memory=32 << 20, cmdline="mib=1 stride=4096")
    vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    try:
        vm.start()
        deadline = time.monotonic() + 60
        while vm.memory.read_u32(passes) < 2:
            assert time.monotonic() < deadline and not vm.stopped, "the guest never completed two passes"
            time.sleep(0.01)
        vm.start_dirty_log()
        counted = vm.memory.read_u32(passes)
        while vm.memory.read_u32(passes) < counted + 2:
            assert time.monotonic() < deadline and not vm.stopped, "the guest stopped counting"
            time.sleep(0.01)
        assert list(vm.dirty_log().pages()) == [passes] + [area + page * 0x1000 for page in range(256)]
        assert vm.memory.read_u32(area + 255 * 0x1000) >= counted + 1
    finally:
        vm.close()


def test_without_host_write_protection_kvm_still_logs_and_the_software_cpu_refuses(writer, accel, monkeypatch):
    """A host kernel before 6.7 (no asynchronous userfaultfd write-protection): on KVM, KVM's
    own log and what devices report still track the guest; the software CPU cannot."""
    from pyvmm.memory import dirty

    monkeypatch.setattr(dirty, "host_tracking_problem", lambda: "this host kernel's userfaultfd has no "
                        "asynchronous write-protection (pretend)")
    vm = writer.vm
    if accel == "tcg":
        with pytest.raises(DirtyTrackingUnavailable, match="pretend"):
            vm.start_dirty_log()
        assert not vm.dirty_logging
        return
    vm.start_dirty_log()
    assert isinstance(vm._dirty_tracker, dirty.DeviceWriteLog)
    targets = [0x300000, 0x500010, 0xFFF000]
    writer.write(targets)
    assert list(vm.dirty_log().pages()) == pages(CONTROL, *targets)
    assert list(vm.dirty_log().pages()) == []
    vm.stop_dirty_log()
    assert vm.memory.on_device_writes is None
