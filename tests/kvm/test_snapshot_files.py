"""Snapshot files on both accelerators: the counting guest (helpers/counter_guest.py) is
paused, snapshotted to a state file and a memory file, its VM closed, and a new VM loaded
from the files in each restore mode: it stays paused until resumed, then counts on from
where it stood and ends normally, having started once. Bad files are one line each and leave
the source VM able to go on."""

from __future__ import annotations

import os
import threading
import time

import pytest

from helpers.counter_guest import COUNT, LIMIT, STEPS, counting_vm, finish
from pyvmm.errors import UserError
from pyvmm.persist import StateError
from pyvmm.snapshot import SnapshotError, load_snapshot, merge_diff, save_snapshot, track_dirty_pages
from pyvmm.snapshot.memory_file import data_ranges
from pyvmm.vm import VmNotPaused

MODES = ["copy", "cow", "uffd"]


def _snapshot(accel: str, tmp_path):
    """A counting VM snapshotted mid-way and closed: (state path, memory path, the count)."""
    vm = counting_vm(accel)
    try:
        vm.pause()
        paused_at = vm.memory.read_u64(COUNT)
        assert 0 < paused_at < STEPS
        saved = save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
    finally:
        vm.close()
    assert saved.memory_size == 16 << 20
    assert 0 < saved.memory_bytes < 1 << 20      # the kernel, its stack and the counter: the rest is holes
    return str(tmp_path / "vm.state"), str(tmp_path / "vm.mem"), paused_at


@pytest.mark.parametrize("mode", MODES)
def test_a_snapshot_loads_and_the_guest_counts_on(accel, tmp_path, mode):
    state, mem, paused_at = _snapshot(accel, tmp_path)
    fd = os.open(mem, os.O_RDONLY)
    try:
        assert sum(e - s for s, e in data_ranges(fd, 0, 16 << 20)) < 1 << 20   # sparse
    finally:
        os.close(fd)
    vm = load_snapshot(state, mem, lambda data: None, mode=mode)
    try:
        assert vm.accel.name == accel and vm.memory.read_u64(LIMIT) == STEPS
        finish(vm, paused_at)
    finally:
        vm.close()


def test_a_snapshot_needs_a_paused_vm(accel, tmp_path):
    vm = counting_vm(accel)
    try:
        with pytest.raises(VmNotPaused, match=r"^the VM must be paused to save its state \(pause\(\) first\)$"):
            save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
        vm.pause()
        with pytest.raises(SnapshotError, match=r"the state and the memory need two files$"):
            save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.state")
        with pytest.raises(SnapshotError, match=r"^a Diff snapshot needs dirty page tracking"):
            save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem", diff=True)
    finally:
        vm.close()
    assert list(tmp_path.iterdir()) == []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bad_snapshot_files_are_one_line_and_the_source_goes_on(accel, tmp_path):
    vm = counting_vm(accel)
    try:
        vm.pause()
        paused_at = vm.memory.read_u64(COUNT)
        save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
        good_state = (tmp_path / "vm.state").read_bytes()
        bad = tmp_path / "bad.state"
        short_mem = tmp_path / "short.mem"
        with open(short_mem, "wb") as out:
            out.truncate(8 << 20)
        cases = [
            (good_state[:len(good_state) // 2], str(tmp_path / "vm.mem"), r": truncated: "),
            (good_state[:-3] + bytes(x ^ 1 for x in good_state[-3:]), str(tmp_path / "vm.mem"), r": bad checksum"),
            (b"NOTPYVMM" + good_state[8:], str(tmp_path / "vm.mem"), r": not a pyvmm state file \(bad magic\)$"),
            (good_state[:8] + b"\x07" + good_state[9:], str(tmp_path / "vm.mem"), r": state file format version 7 is"),
            (good_state, str(short_mem), r"short\.mem: the memory file holds 8388608 bytes, the snapshot's guest RAM "
                                         r"is 16777216 bytes \(16 MiB\)$"),
        ]
        threads, fds = threading.active_count(), _open_fds()
        for state_bytes, mem, message in cases:
            bad.write_bytes(state_bytes)
            with pytest.raises(StateError, match=message) as error:
                load_snapshot(bad, mem, lambda data: None)
            assert "\n" not in str(error.value)
            assert threading.active_count() == threads and _open_fds() == fds   # nothing left built
        with pytest.raises(SnapshotError, match=r"^restore mode 'fast' is not one of copy, cow, uffd$"):
            load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem", lambda data: None, mode="fast")
        assert vm.memory.read_u64(COUNT) == paused_at
        finish(vm, paused_at)     # the source, never harmed, goes on
    finally:
        vm.close()


def test_a_diff_merged_onto_its_base_loads_and_the_guest_counts_on(accel, tmp_path):
    """Full snapshot, the guest counts on, Diff snapshot (only the pages written meanwhile),
    Diff merged onto the Full file: the merged files continue from the Diff's moment."""
    vm = counting_vm(accel)
    try:
        track_dirty_pages(vm)
        vm.pause()
        save_snapshot(vm, tmp_path / "base.state", tmp_path / "vm.mem")
        first = vm.memory.read_u64(COUNT)
        vm.resume()
        while vm.memory.read_u64(COUNT) < first + 200 and not vm.stopped:
            time.sleep(0.001)
        vm.pause()
        paused_at = vm.memory.read_u64(COUNT)
        assert first < paused_at < STEPS
        saved = save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.diff", diff=True)
    finally:
        vm.close()
    # The counter's page and the stack's page (the UART's state is in the state file).
    assert 0 < saved.memory_bytes <= 4 * 4096 and saved.memory_size == 16 << 20
    assert merge_diff(str(tmp_path / "vm.diff"), str(tmp_path / "vm.mem")) == saved.memory_bytes
    vm = load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem", lambda data: None)
    try:
        finish(vm, paused_at)
    finally:
        vm.close()


def _resident(memory) -> int:
    """Bytes of guest RAM present in its memfds."""
    return sum(end - start for region in memory.regions for start, end in data_ranges(region.fd, 0, region.size))


def _file_data(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(end - start for start, end in data_ranges(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def test_uffd_loads_only_what_is_touched_until_populated(accel, tmp_path):
    """Without prefetch, RAM holds only the pages the restore and the guest touched; populate()
    loads the rest and lets the handler go; the guest then counts on."""
    state, mem, paused_at = _snapshot(accel, tmp_path)
    vm = load_snapshot(state, mem, lambda data: None, mode="uffd", prefetch=False)
    try:
        lazy = vm.memory.populator.__self__
        assert lazy.process.poll() is None            # the handler serves the faults
        assert vm.memory.read_u64(COUNT) == paused_at  # a fault, answered from the file
        touched = _resident(vm.memory)
        assert 0 < touched < _file_data(mem)
        vm.memory.populate()
        assert _resident(vm.memory) >= _file_data(mem)
        assert lazy.process.wait(10) == 0             # done: the handler ended
        finish(vm, paused_at)
    finally:
        vm.close()


def test_uffd_handler_that_dies_stops_the_vm_with_one_line(accel, tmp_path):
    state, mem, paused_at = _snapshot(accel, tmp_path)
    vm = load_snapshot(state, mem, lambda data: None, mode="uffd", prefetch=False)
    try:
        lazy = vm.memory.populator.__self__
        lazy.process.kill()
        outcome = vm.wait(30)
        assert outcome is not None and outcome.reason == "vmm-error"
        assert outcome.message == f"the userfaultfd handler (pid {lazy.process.pid}) ended before guest RAM was loaded"
    finally:
        vm.close()


def test_cow_maps_the_file_privately(accel, tmp_path):
    """The guest's writes stay in the VM: the memory file is the same after it ran to its end."""
    state, mem, paused_at = _snapshot(accel, tmp_path)
    before = open(mem, "rb").read()
    vm = load_snapshot(state, mem, lambda data: None, mode="cow")
    try:
        assert all(region.fd == -1 and not region.shared for region in vm.memory.regions)
        finish(vm, paused_at)
    finally:
        vm.close()
    assert open(mem, "rb").read() == before


def test_modes_a_device_cannot_use_are_refused_with_one_line(accel, tmp_path, monkeypatch):
    import dataclasses

    from pyvmm.memory import userfaultfd
    from pyvmm.vm_state import DiskDescription

    state, mem, _ = _snapshot(accel, tmp_path)

    def with_vhost_user(saved):
        disk = DiskDescription(path=None, readonly=False, serial=None, transport="pci", vhost_user="/tmp/none.sock")
        return dataclasses.replace(saved, machine=dataclasses.replace(saved.machine, disks=(disk,)))

    with pytest.raises(SnapshotError, match=r"^restore mode cow: virtio-blk0 shares guest RAM with its vhost-user "
                                            r"back-end by fd, which a private mapping of the memory file cannot "
                                            r"give: use copy or uffd$"):
        load_snapshot(state, mem, lambda data: None, mode="cow", prepare=with_vhost_user)

    def no_userfaultfd(**_):
        raise userfaultfd.HostMemoryError("userfaultfd", 38)

    monkeypatch.setattr(userfaultfd, "available_features", no_userfaultfd)
    with pytest.raises(UserError, match=r"^uffd restore: this host offers no userfaultfd \(userfaultfd: Function not "
                                        r"implemented\): use copy or cow$"):
        load_snapshot(state, mem, lambda data: None, mode="uffd")


def test_dirty_tracking_on_a_lazily_loaded_vm_finishes_loading_first(accel, tmp_path):
    """Tracking registers RAM on a userfaultfd of its own: the uffd restore's must be done."""
    state, mem, paused_at = _snapshot(accel, tmp_path)
    vm = load_snapshot(state, mem, lambda data: None, mode="uffd", prefetch=False)
    try:
        lazy = vm.memory.populator.__self__
        track_dirty_pages(vm)
        assert lazy.complete.is_set() and lazy.process.wait(10) == 0
        vm.resume()
        while vm.memory.read_u64(COUNT) < paused_at + 100 and not vm.stopped:
            time.sleep(0.001)
        vm.pause()
        assert vm.dirty_log().is_dirty(COUNT & ~0xFFF)
    finally:
        vm.close()


def test_a_snapshot_of_another_machine_is_refused_with_one_line(accel, tmp_path):
    import dataclasses

    from helpers.counter_guest import counter_config

    state, mem, _ = _snapshot(accel, tmp_path)
    for other, field in ((dataclasses.replace(counter_config(), cpus=2), "cpus"),
                         (dataclasses.replace(counter_config(), rng="pci"), "rng")):
        with pytest.raises(StateError, match=rf"^vm state: machine\.{field}: the state's machine differs from "
                                             r"this one's$"):
            load_snapshot(state, mem, lambda data: None, config=other)


def test_a_snapshot_that_cannot_be_written_leaves_the_vm_as_it_was(accel, tmp_path):
    vm = counting_vm(accel)
    try:
        vm.pause()
        paused_at = vm.memory.read_u64(COUNT)
        with pytest.raises(UserError, match=r"cannot write the memory file: No such file or directory$"):
            save_snapshot(vm, tmp_path / "vm.state", tmp_path / "missing" / "vm.mem")
        (tmp_path / "vm.mem").mkdir()      # the memory file's name is a directory
        with pytest.raises(UserError, match=r"vm\.mem: cannot write the memory file: Is a directory$"):
            save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.mem"]
        finish(vm, paused_at)
    finally:
        vm.close()
