"""Clones of a snapshot: many VMs continuing one snapshot, each its own.

`start_clone(STATE, MEM, NAME, DIRECTORY, console_write)` loads the snapshot in the cow restore
mode (every clone maps the one memory file privately: pages no clone writes stay shared in
the page cache, a write stays in the clone that made it) with the clone's own resources
(`clone_state`: disk copies, MACs, TAP, vsock socket) and gives it a new identity
(identity.refresh_identity: VM generation ID, vsock CID). The API's PUT /snapshot/load takes
the same through pyvmm's `clone` field, and `pyvmm clone --from-snapshot` through that.
copy_sparse and random_mac serve manage/clone.py's virt-clone too.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
from pathlib import Path
from typing import Callable, Sequence

from .errors import UserError


class CloneExists(UserError):
    """A file a clone would create is there already."""


def random_mac() -> str:
    """A locally administered unicast address in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def copy_sparse(source: Path, target: Path) -> None:
    """Copy `source` to the new file `target`, data extents only (holes stay holes)."""
    try:
        fin = open(source, "rb")
    except OSError as exc:
        raise UserError(f"{source}: {exc.strerror}") from None
    with fin:
        try:
            fout = open(target, "xb")
        except FileExistsError:
            raise CloneExists(f"{target} exists already: pyvmm will not overwrite it") from None
        with fout:
            size = os.fstat(fin.fileno()).st_size
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # only a hole is left
                    raise
                hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                _copy_range(fin.fileno(), fout.fileno(), data, hole - data)
                offset = hole
            os.ftruncate(fout.fileno(), size)


def _copy_range(fd_in: int, fd_out: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        try:
            count = os.copy_file_range(fd_in, fd_out, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            count = 0
        if count == 0:  # no in-kernel copy here: read and write
            chunk = os.pread(fd_in, min(end - offset, 1 << 20), offset)
            if not chunk:
                return
            count = os.pwrite(fd_out, chunk, offset)
        offset += count


def clone_state(state, name: str, directory: Path, taps: Sequence[str] = ()):
    """`state` (a snapshot's VmState) as clone NAME's: each writable disk image copied to
    DIRECTORY/NAME-diskN.EXT (copy_sparse: holes stay holes, blocks shared where the filesystem
    reflinks through copy_file_range), read-only images shared; each NIC a new MAC (its device
    offers it in its config space; a guest that read the old one at boot keeps using it until
    told) and its own TAP (`taps`, by NIC; an `auto` TAP is made anew anyway, a named one
    cannot be shared); the vsock host socket DIRECTORY/NAME.vsock. The guest CID and generation ID are
    new_identity's, once the clone is loaded."""
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"{name!r} is not a clone name (no '/', not starting with '.')")
    machine = state.machine
    disks, copied = [], []
    try:
        for index, disk in enumerate(machine.disks):
            if disk.vhost_user is not None:
                raise UserError(f"disk {index} is a vhost-user back-end: pyvmm cannot copy it for a clone")
            if disk.readonly or disk.path is None:
                disks.append(disk)
                continue
            source = Path(disk.path)
            target = directory / f"{name}-disk{index}{source.suffix}"
            copy_sparse(source, target)
            copied.append(target)
            disks.append(dataclasses.replace(disk, path=str(target)))
        devices = dict(state.devices)
        nets = []
        if len(taps) > len(machine.nets):
            raise UserError(f"{len(taps)} TAPs given, the snapshot's VM has {len(machine.nets)} NIC(s)")
        for index, net in enumerate(machine.nets):
            tap = taps[index] if index < len(taps) else net.tap
            if tap == net.tap and tap != "auto":
                raise UserError(f"NIC {index} uses TAP {tap}, which a clone cannot share: give the clone a TAP of its own")
            mac = random_mac()
            nets.append(dataclasses.replace(net, mac=mac, tap=tap))
            device_id = state.machine.to_config().net_id(index)
            virtio = devices[device_id]
            devices[device_id] = _with_mac(virtio, bytes.fromhex(mac.replace(":", "")))
        vsock = machine.vsock
        if vsock is not None:
            vsock = dataclasses.replace(vsock, uds=str(directory / f"{name}.vsock"))
        machine = dataclasses.replace(machine, disks=tuple(disks), nets=tuple(nets), vsock=vsock)
        return dataclasses.replace(state, machine=machine, devices=devices), copied
    except BaseException:
        for path in copied:
            path.unlink(missing_ok=True)
        raise


def _with_mac(state, mac: bytes):
    """A virtio-net transport state (or the net state itself) with the device's MAC replaced."""
    from .devices.virtio.net import NetState

    if isinstance(state, NetState):
        return dataclasses.replace(state, mac=mac)
    inner = getattr(state, "device", None)     # a transport's state holds its device's
    if inner is None:
        raise UserError(f"a {state.KIND!r} state holds no virtio-net device state")
    return dataclasses.replace(state, device=_with_mac(inner, mac))


def start_clone(snapshot_path, mem_file_path, name: str, directory: Path, console_write, *, mode: str = "cow",
                accel=None, vsock_cid: int | None = None, taps: Sequence[str] = ()):
    """Clone NAME of the snapshot, loaded (`mode` cow: every clone maps the one memory file
    privately, so pages no clone writes stay shared in the page cache) and paused, with its own
    disks, MACs and vsock socket (clone_state) and a new identity (a new VM generation ID and
    vsock CID: identity.refresh_identity; the guest's machine id and random pool are its
    agent's, AgentClient.set_identity, and so are its MACs: identity.macs, for
    AgentClient.set_mac_addresses). Returns (vm, identity); vm.resume() runs it."""
    from .identity import refresh_identity
    from .snapshot import load_snapshot

    copied: list[Path] = []
    macs: dict[str, str] = {}

    def prepare(state):
        cloned, made = clone_state(state, name, Path(directory), taps)
        copied.extend(made)
        macs.update(mac_changes(state, cloned))
        return cloned

    try:
        vm = load_snapshot(snapshot_path, mem_file_path, console_write, mode=mode, accel=accel, prepare=prepare)
    except BaseException:
        for path in copied:
            path.unlink(missing_ok=True)
        raise
    try:
        identity = refresh_identity(vm, vsock_cid=vsock_cid)
    except BaseException:
        vm.close()
        raise
    return vm, dataclasses.replace(identity, macs=macs)


def mac_changes(state, cloned) -> dict[str, str]:
    """The snapshot's MAC -> the clone's, for each NIC (a NIC without a configured MAC had the
    builder's default for its index)."""
    from .config import default_mac

    return {(old.mac or default_mac(index)): new.mac for index, (old, new)
            in enumerate(zip(state.machine.nets, cloned.machine.nets)) if new.mac and old.mac != new.mac}
