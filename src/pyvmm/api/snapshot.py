"""Firecracker's snapshot resources on a VmInstance: PUT /snapshot/create and PUT /snapshot/load.

create: the VM must be paused (400 otherwise, as Firecracker); Full writes all of RAM, Diff
the pages written since the previous snapshot (machine-config track_dirty_pages). The
state file records the VM's configuration document too, so a VM loaded from it answers
GET /vm/config and knows its interfaces' ids.

load: only in a fresh instance, before InstanceStart and before any resource but the logger
and metrics is configured (Firecracker's rule). The memory comes from mem_backend
(backend_type File: the memory file; Uffd: a page-fault handler listening at backend_path,
which is sent the userfaultfd) or the deprecated mem_file_path, exactly one of them.
network_overrides point interfaces at other TAPs, vsock_override the vsock device at another
socket; track_dirty_pages starts the dirty log; resume_vm runs the VM at once. pyvmm's own
field restore_mode says how a File backend is loaded: copy (default), cow or uffd (see
pyvmm.snapshot).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .schema import (CLONE, MEMORY_BACKEND, NETWORK_OVERRIDE, SNAPSHOT_CREATE, SNAPSHOT_LOAD, VSOCK_OVERRIDE, VmSpec,
                     check_body)
from .states import NOT_STARTED, PAUSED, RUNNING, InvalidState

if TYPE_CHECKING:
    from .instance import VmInstance


def create(instance: "VmInstance", body: Any) -> None:
    from ..snapshot import save_snapshot

    checked = check_body(body, SNAPSHOT_CREATE)
    with instance.lock:
        vm = instance._require_vm()
        if instance.state != PAUSED:
            raise InvalidState("the VM must be paused to create a snapshot (PATCH /vm {\"state\": \"Paused\"})")
        save_snapshot(vm, checked["snapshot_path"], checked["mem_file_path"],
                      diff=checked.get("snapshot_type", "Full") == "Diff",
                      vm_config={"name": instance.id, **instance.spec.to_document()})


def _fresh(spec: VmSpec) -> bool:
    """Nothing configured but the logger and metrics."""
    return dataclasses.replace(spec, logger=None, metrics=None) == VmSpec()


def load(instance: "VmInstance", body: Any) -> None:
    from ..snapshot import load_snapshot, read_snapshot

    checked = check_body(body, SNAPSHOT_LOAD)
    memory_path, handler = _memory_source(checked)
    mode = checked.get("restore_mode", "copy")
    if handler is not None:
        if "restore_mode" in checked and mode != "uffd":
            raise ConfigError("must be uffd (or absent) with backend_type Uffd", "restore_mode")
        mode = "uffd"
    overrides = [check_body(item, NETWORK_OVERRIDE, f"network_overrides[{index}].")
                 for index, item in enumerate(checked.get("network_overrides", []))]
    vsock = check_body(checked["vsock_override"], VSOCK_OVERRIDE, "vsock_override.") \
        if "vsock_override" in checked else None
    clone = check_body(checked["clone"], CLONE, "clone.") if "clone" in checked else None
    copies: list = []
    with instance.lock:
        if instance.state != NOT_STARTED:
            raise InvalidState("a snapshot can only be loaded before InstanceStart, into a fresh VM")
        if not _fresh(instance.spec):
            raise InvalidState("a snapshot can only be loaded before any resource but the logger and metrics "
                               "is configured")
        _, document = read_snapshot(checked["snapshot_path"])
        spec = VmSpec.from_document(document, extra=("name",)) if document is not None else None

        def prepare(state):
            if clone is not None:
                from ..clones import clone_state

                state, made = clone_state(state, clone["name"], Path(clone["directory"]))
                copies.extend(made)
            return _overridden(state, spec, overrides, vsock)

        try:
            vm = load_snapshot(checked["snapshot_path"], memory_path, instance.console.write, mode=mode,
                               prepare=prepare, uffd_handler=handler)
        except BaseException:
            for path in copies:
                path.unlink(missing_ok=True)
            raise
        try:
            if clone is not None:
                from ..identity import refresh_identity

                refresh_identity(vm)
            if checked.get("track_dirty_pages"):
                vm.start_dirty_log()
            machine = vm.machine
            assert machine is not None, "a restored Vm has its machine description"
            instance.console.attach_port(vm.devices["virtio-console" if machine.console == "virtio" else "com1"])
        except BaseException:
            vm.close()
            raise
        from ..accel.select import choose_accelerator

        instance._built = (machine, choose_accelerator(vm.accel.name), None)
        if spec is not None:
            instance.spec = _spec_after(spec, overrides, vsock)
            if clone is not None:
                instance.spec = _spec_of_clone(instance.spec, machine)
        instance.vm, instance.state = vm, PAUSED
        instance.boots += 1
        instance.started_at = time.time()
        if checked.get("resume_vm"):
            vm.resume()
            instance.state = RUNNING
        instance.watch()


def _memory_source(checked: dict[str, Any]) -> tuple[str, str | None]:
    """(memory file, uffd handler socket or None) from mem_backend or mem_file_path."""
    backend = checked.get("mem_backend")
    if (backend is None) == ("mem_file_path" not in checked):
        raise ConfigError("give mem_backend or (deprecated) mem_file_path, exactly one", "mem_backend")
    if backend is None:
        return checked["mem_file_path"], None
    backend = check_body(backend, MEMORY_BACKEND, "mem_backend.")
    if backend["backend_type"] == "File":
        return backend["backend_path"], None
    return "", backend["backend_path"]


def _interfaces(spec: VmSpec | None, count: int) -> list[str]:
    """The ids of the snapshot's interfaces, in device order (device-tree ids without a document)."""
    if spec is not None and len(spec.interfaces) == count:
        return list(spec.interfaces)
    return [f"virtio-net{index}" for index in range(count)]


def _overridden(state, spec: VmSpec | None, overrides: list[dict[str, Any]], vsock: dict[str, Any] | None):
    machine = state.machine
    nets = list(machine.nets)
    ids = _interfaces(spec, len(nets))
    for index, override in enumerate(overrides):
        if override["iface_id"] not in ids:
            raise ConfigError(f"{override['iface_id']!r} is not an interface of the snapshot "
                              f"(it has: {', '.join(ids) or 'none'})", f"network_overrides[{index}].iface_id")
        position = ids.index(override["iface_id"])
        nets[position] = dataclasses.replace(nets[position], tap=override["host_dev_name"])
    changes: dict[str, Any] = {"nets": tuple(nets)}
    if vsock is not None:
        if machine.vsock is None:
            raise ConfigError("the snapshot's VM has no vsock device", "vsock_override")
        changes["vsock"] = dataclasses.replace(machine.vsock, uds=vsock["uds_path"])
    return dataclasses.replace(state, machine=dataclasses.replace(machine, **changes))


def _spec_of_clone(spec: VmSpec, machine) -> VmSpec:
    """The configuration document of a clone: its disk copies, MACs, vsock socket and CID."""
    spec = spec.copy()
    for drive, disk in zip(spec.drives.values(), machine.disks):
        drive["path_on_host"] = disk.path
    for interface, net in zip(spec.interfaces.values(), machine.nets):
        interface["guest_mac"] = net.mac
    if spec.vsock is not None and machine.vsock is not None:
        spec.vsock["uds_path"], spec.vsock["guest_cid"] = machine.vsock.uds, machine.vsock.cid
    return spec


def _spec_after(spec: VmSpec, overrides: list[dict[str, Any]], vsock: dict[str, Any] | None) -> VmSpec:
    """The configuration document of the loaded VM, with the overrides applied."""
    spec = spec.copy()
    for override in overrides:
        if override["iface_id"] in spec.interfaces:
            spec.interfaces[override["iface_id"]]["host_dev_name"] = override["host_dev_name"]
    if vsock is not None and spec.vsock is not None:
        spec.vsock["uds_path"] = vsock["uds_path"]
    return spec
