"""`pyvmm clone`: a new VM from a defined one, like virt-clone; or from a snapshot.

Writable drives are copied next to the originals as NEW-DRIVEID.EXT, extent by extent:
holes stay holes (SEEK_DATA/SEEK_HOLE), and copy_file_range lets filesystems that can
(btrfs, XFS) share the blocks instead of copying them (a reflink). Read-only drives are
shared. Each NIC gets a new random MAC address, the vsock device a CID no other definition
uses and a socket path of its own. The source must not be running (its disks would be
copied mid-write); a paused VM is fine.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..clones import CloneExists, copy_sparse, random_mac
from ..errors import UserError
from . import definitions
from .records import RunDir, VmExists, check_name


def clone(host, source: str, new_name: str):
    """Define NEW_NAME as a copy of SOURCE on `host` (a client.Host); returns its handle."""
    check_name(new_name)
    if definitions.find(new_name, host.config_dir) is not None or RunDir.of(new_name, host.run_root).pid():
        raise VmExists(f"a VM named {new_name!r} exists already")
    original = definitions.load(source, host.config_dir)
    if host.vm(source).state() not in ("shut off", "crashed", "paused"):
        raise UserError(f"{source} is running: shut it down or suspend it before cloning its disks")
    document = copy.deepcopy(original.spec.to_document())
    copied: list[Path] = []
    try:
        for drive in document.get("drives", []):
            if drive.get("socket"):
                raise UserError(f"drive {drive['drive_id']!r} is a vhost-user back-end: pyvmm cannot copy it")
            if drive.get("is_read_only"):
                continue  # shared, like virt-clone's read-only disks
            source_path = Path(drive["path_on_host"])
            target = source_path.with_name(f"{new_name}-{drive['drive_id']}{source_path.suffix}")
            try:
                copy_sparse(source_path, target)
            except CloneExists as exc:
                raise VmExists(str(exc)) from None
            copied.append(target)
            drive["path_on_host"] = str(target)
        for interface in document.get("network-interfaces", []):
            interface["guest_mac"] = random_mac()
        if "vsock" in document:
            document["vsock"]["guest_cid"] = free_cid(host)
            document["vsock"]["uds_path"] = str(Path(document["vsock"]["uds_path"]).with_name(f"{new_name}.vsock"))
        return host.define(document, new_name)
    except BaseException:
        for path in copied:
            path.unlink(missing_ok=True)
        raise


def free_cid(host) -> int:
    used = {2}
    for name in definitions.names(host.config_dir):
        try:
            vsock = definitions.load(name, host.config_dir).spec.vsock
        except UserError:
            continue
        if vsock is not None:
            used.add(vsock["guest_cid"])
    return max(used) + 1


def clone_from_snapshot(host, files: dict[str, str], new_name: str, *, mode: str = "cow"):
    """Start NEW_NAME as a clone of the snapshot `files` (snapshot_path, mem_file_path), taken
    through the API (which records the VM's configuration with it): a VM process that loads it
    (launch's `restore`) with PUT /snapshot/load's `clone` field (pyvmm.clones: memory
    copy-on-write, disk copies next to the state file, new MACs, vsock socket and CID, a new VM
    generation ID) and runs it; then NEW_NAME is defined with the clone's configuration, so a
    later start boots it afresh, and the guest agent gives the running guest its NICs' new
    MACs. Its handle."""
    from ..snapshot import read_snapshot
    from .launch import launch

    check_name(new_name)
    if definitions.find(new_name, host.config_dir) is not None or RunDir.of(new_name, host.run_root).pid():
        raise VmExists(f"a VM named {new_name!r} exists already")
    state, document = read_snapshot(files["snapshot_path"])    # a bad file: one line, nothing started
    if document is None:
        raise UserError(f"{files['snapshot_path']}: the snapshot records no VM configuration (it was not taken "
                        "through the API): clone it in a program with pyvmm.clones.start_clone")
    document = {key: value for key, value in document.items() if key != "name"}
    restore = {"snapshot_path": files["snapshot_path"], "resume_vm": True, "restore_mode": mode,
               "mem_backend": {"backend_type": "File", "backend_path": files["mem_file_path"]},
               "clone": {"name": new_name, "directory": str(Path(files["snapshot_path"]).parent)}}
    launch(RunDir.of(new_name, host.run_root), document, instance_id=new_name, restore=restore)
    handle = host.vm(new_name)
    try:
        config = handle.config()
        host.define(config, new_name)
    except BaseException:
        handle.destroy()
        raise
    _guest_uses_new_macs(state, config, new_name)
    return handle


def _guest_uses_new_macs(state, config: dict, name: str) -> None:
    """The clone's NICs offer new MACs, but its guest read the snapshot's when it booted: its
    agent sets the new ones on the interfaces that have the old ones. A guest without an agent
    keeps the old ones (a one-line warning)."""
    import logging

    from ..agent.client import AgentClient
    from ..config import default_mac

    interfaces = config.get("network-interfaces") or []
    changes = {(net.mac or default_mac(index)): interface["guest_mac"] for index, (net, interface)
               in enumerate(zip(state.machine.nets, interfaces))
               if interface.get("guest_mac") and interface["guest_mac"] != (net.mac or default_mac(index))}
    vsock = config.get("vsock")
    if not changes:
        return
    try:
        if not vsock:
            raise UserError("it has no vsock device for the guest agent")
        AgentClient(vsock["uds_path"]).set_mac_addresses(changes)
    except (UserError, ValueError) as exc:
        logging.getLogger(__name__).warning("%s: its guest still uses the snapshot's MAC address(es): %s", name, exc)
