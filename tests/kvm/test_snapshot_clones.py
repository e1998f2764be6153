"""Clones from one snapshot (manage/clone.py start_clone), on both accelerators: the counting
tiny guest, given a writable disk, a NIC and a vsock device, is snapshotted mid-way and
closed; three clones are loaded from the one snapshot (copy-on-write of the one memory file).
Each has its own identity (VM generation ID, vsock CID and socket, MAC) and its own disk copy;
each counts on from the snapshot's moment and ends normally; what one writes is not seen by
another, nor by the snapshot's files."""

from __future__ import annotations

import hashlib

import pytest

from helpers.counter_guest import COUNT, STEPS, counter_config, counting_vm, finish
from pyvmm.arch.x86_64 import layout
from pyvmm.config import DiskConfig, NetConfig, VsockConfig
from pyvmm.errors import UserError
from pyvmm.clones import start_clone
from pyvmm.snapshot import save_snapshot

CLONES = 3
MODE = "cow"
MARK = 0x380000     # a page the guest never touches: the host writes a clone's name there


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def snapshot(accel, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"original".ljust(1 << 20, b"\0"))
    config = counter_config()
    config = type(config)(**{**config.__dict__, "disks": (DiskConfig(path=str(disk)),),
                             "nets": (NetConfig(tap="auto", mac="52:54:00:12:34:56"),),
                             "vsock": VsockConfig(cid=3, uds=str(tmp_path / "vm.vsock"))})
    vm = counting_vm(accel, config=config)
    try:
        vm.pause()
        paused_at = vm.memory.read_u64(COUNT)
        save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
    finally:
        vm.close()
    return tmp_path / "vm.state", tmp_path / "vm.mem", paused_at, disk


def test_clones_of_one_snapshot_are_each_their_own(snapshot, tmp_path):
    state, mem, paused_at, disk = snapshot
    files = {path: _digest(path) for path in (state, mem, disk)}
    clones = []
    try:
        for index in range(CLONES):
            clones.append(start_clone(state, mem, f"clone{index}", tmp_path, lambda data: None, mode=MODE))
        vms = [vm for vm, _ in clones]
        identities = [identity for _, identity in clones]
        assert len({i.generation_id for i in identities}) == CLONES
        assert len({i.vsock_cid for i in identities}) == CLONES and 3 not in {i.vsock_cid for i in identities}
        assert len({vm.machine.vsock.uds for vm in vms}) == CLONES
        assert len({vm.machine.nets[0].mac for vm in vms} | {"52:54:00:12:34:56"}) == CLONES + 1
        for index, vm in enumerate(vms):
            assert vm.memory.read(layout.VMGENID_ADDRESS, 16) == identities[index].generation_id
            assert vm.device_manager.device("virtio-vsock").guest_cid == identities[index].vsock_cid
            assert vm.device_manager.device("virtio-net0").mac.hex(":") == vm.machine.nets[0].mac
            copy = tmp_path / f"clone{index}-disk0.img"
            assert vm.machine.disks[0].path == str(copy) and copy.read_bytes()[:8] == b"original"
        # the first clone runs to its end and is marked; the others have not moved
        finish(vms[0], paused_at)
        vms[0].memory.write(MARK, b"clone0")
        for vm in vms[1:]:
            assert vm.memory.read_u64(COUNT) == paused_at and vm.memory.read(MARK, 6) == bytes(6)
        for vm in vms[1:]:
            finish(vm, paused_at)
            assert vm.memory.read(MARK, 6) == bytes(6)
        assert {path: _digest(path) for path in files} == files     # the snapshot and its disk untouched
    finally:
        for vm, _ in clones:
            vm.close()


def test_a_clone_name_that_is_taken_leaves_nothing_behind(snapshot, tmp_path):
    state, mem, _, _ = snapshot
    (tmp_path / "taken-disk0.img").write_bytes(b"someone else's")
    with pytest.raises(UserError, match=r"taken-disk0\.img exists already: pyvmm will not overwrite it$"):
        start_clone(state, mem, "taken", tmp_path, lambda data: None, mode=MODE)
    assert (tmp_path / "taken-disk0.img").read_bytes() == b"someone else's"
    assert not (tmp_path / "taken.vsock").exists()
