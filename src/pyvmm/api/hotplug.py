"""Hotplug over the per-VM API, in Firecracker's form: after InstanceStart, PUT /drives/{id} and
PUT /network-interfaces/{id} plug a device into the running VM (pyvmm/hotplug.py), DELETE on
the same paths unplugs it once the guest has ejected it (?timeout=SECONDS, default 60;
?force=true: without waiting, which loses the guest's requests in flight).

PUT /vsock and PUT /entropy after InstanceStart plug the VM's one vsock or entropy device in
when it has none; DELETE /vsock and /entropy unplug it the same way.

The configuration (GET /vm/config) follows, so does the machine a reboot builds; a device
keeps its drive or interface id as its device-tree id. The lock is not held while the guest is
asked to eject: other requests are served meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .schema import PYVMM_VCPUS, check_body, drive_disk, interface_net

if TYPE_CHECKING:
    from .instance import VmInstance

MAX_TIMEOUT = 3600.0


def put_drive(instance: VmInstance, drive_id: str, drive: dict[str, Any]) -> None:
    """A checked drive plugged into the running VM."""
    from ..hotplug import attach_disk

    if drive["is_root_device"]:
        raise ConfigError("must be false for a drive added to a running VM", "is_root_device")
    with instance.lock:
        vm = instance._require_vm()
        if drive_id in instance.spec.drives:
            raise ConfigError(f"{drive_id!r}: the VM has that drive already (DELETE it first)", "drive_id")
        attach_disk(vm, drive_disk(drive, instance.spec.pyvmm.get("transport", "pci")))
        instance.spec.drives[drive_id] = drive
        _keep_machine(instance, vm)


def put_interface(instance: VmInstance, iface_id: str, interface: dict[str, Any]) -> None:
    """A checked network interface plugged into the running VM."""
    from ..hotplug import attach_net

    with instance.lock:
        vm = instance._require_vm()
        if iface_id in instance.spec.interfaces:
            raise ConfigError(f"{iface_id!r}: the VM has that interface already (DELETE it first)", "iface_id")
        attach_net(vm, interface_net(interface, instance.spec.pyvmm.get("transport", "pci")))
        instance.spec.interfaces[iface_id] = interface
        _keep_machine(instance, vm)


def put_vsock(instance: VmInstance, vsock: dict[str, Any]) -> None:
    """The vsock device plugged into a running VM that has none (one per VM)."""
    from ..config import VsockConfig
    from ..hotplug import attach_vsock

    with instance.lock:
        vm = instance._require_vm()
        attach_vsock(vm, VsockConfig(vsock["guest_cid"], vsock["uds_path"], instance.spec.pyvmm.get("transport", "pci")))
        instance.spec.vsock = vsock
        _keep_machine(instance, vm)


def put_entropy(instance: VmInstance, entropy: dict[str, Any]) -> None:
    """The entropy device (virtio-rng) plugged into a running VM that has none (one per VM)."""
    from ..hotplug import attach_rng

    with instance.lock:
        vm = instance._require_vm()
        attach_rng(vm, instance.spec.pyvmm.get("transport", "pci"))
        instance.spec.entropy = entropy
        _keep_machine(instance, vm)


SINGLE_DEVICES = {"vsock": "virtio-vsock", "entropy": "virtio-rng"}   # API resource -> device-tree id


def delete_single(instance: VmInstance, resource: str, query: dict[str, str]) -> None:
    """DELETE /vsock or /entropy: the running VM's one device of that kind, once the guest ejected it."""
    from ..hotplug import detach

    timeout, force = _options(query)
    with instance.lock:
        vm = instance._require_vm()
        if getattr(instance.spec, resource) is None:
            raise ConfigError(f"the VM has no {resource} device", resource)

    def unplugged() -> None:    # now, or later: a guest that ejects after the timeout
        with instance.lock:
            if instance.vm is vm:
                setattr(instance.spec, resource, None)
                _keep_machine(instance, vm)

    detach(vm, SINGLE_DEVICES[resource], timeout=timeout, force=force, on_unplugged=unplugged)


def delete_drive(instance: VmInstance, drive_id: str, query: dict[str, str]) -> None:
    _delete(instance, drive_id, query, instance.spec.drives, "drive")


def delete_interface(instance: VmInstance, iface_id: str, query: dict[str, str]) -> None:
    _delete(instance, iface_id, query, instance.spec.interfaces, "interface")


def _delete(instance: VmInstance, device_id: str, query: dict[str, str], table: dict, what: str) -> None:
    from ..hotplug import detach

    timeout, force = _options(query)
    with instance.lock:
        vm = instance._require_vm()
        if device_id not in table:
            raise ConfigError(f"{device_id!r}: no such {what}", f"{what}_id" if what == "drive" else "iface_id")
    def unplugged() -> None:    # now, or later: a guest that ejects after the timeout
        with instance.lock:
            if instance.vm is vm:
                table.pop(device_id, None)
                _keep_machine(instance, vm)

    detach(vm, device_id, timeout=timeout, force=force, on_unplugged=unplugged)   # the guest ejects it meanwhile


def _options(query: dict[str, str]) -> tuple[float, bool]:
    from ..hotplug import DEFAULT_EJECT_TIMEOUT

    unknown = sorted(set(query) - {"timeout", "force"})
    if unknown:
        raise ConfigError("is not a known parameter (known: timeout, force)", unknown[0])
    force_text = query.get("force", "false").lower()
    if force_text not in ("true", "false", "1", "0"):
        raise ConfigError(f"must be true or false (got {force_text!r:.20})", "force")
    try:
        timeout = float(query.get("timeout", DEFAULT_EJECT_TIMEOUT))
    except ValueError:
        raise ConfigError(f"must be a number of seconds (got {query['timeout']!r:.20})", "timeout") from None
    if not 0 < timeout <= MAX_TIMEOUT:
        raise ConfigError(f"must be more than 0 and at most {MAX_TIMEOUT:g} seconds", "timeout")
    return timeout, force_text in ("true", "1")


def put_vcpus(instance: VmInstance, body: Any) -> None:
    """PUT /pyvmm/vcpus: plug vCPUs in or take them out (virsh setvcpus)."""
    from ..hotplug import set_vcpus

    checked = check_body(body, PYVMM_VCPUS)
    with instance.lock:
        vm = instance._require_vm()
    set_vcpus(vm, checked["count"], timeout=checked.get("timeout", 60))   # removals wait for the guest
    with instance.lock:
        instance.spec.machine["vcpu_count"] = vm.machine.cpus
        if instance.vm is vm:
            _keep_machine(instance, vm)


def get_vcpus(instance: VmInstance) -> dict[str, Any]:
    with instance.lock:
        vm = instance._require_vm()
        return {"count": len(vm.vcpus), "max": vm.machine.possible_cpus}


def _keep_machine(instance: VmInstance, vm) -> None:
    """A reboot builds the machine as it is now, hot-plugged devices included."""
    if instance._built is not None:
        instance._built = (vm.machine, *instance._built[1:])


_FAULT = {"description": "bad input, or an operation the VM's state does not allow",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_INTERNAL = {"description": "internal error (a pyvmm bug)",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _delete_operation(operation: str, param: str | None, what: str) -> dict[str, Any]:
    path_params = [{"name": param, "in": "path", "required": True, "schema": {"type": "string"}}] if param else []
    return {
        "operationId": operation,
        "summary": f"pyvmm: unplug a {what} from the running VM (PCI hotplug): the guest is asked to eject it and "
                   "the answer waits until it has. 400 if it does not within the timeout (the device stays)",
        "parameters": [
            *path_params,
            {"name": "timeout", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": MAX_TIMEOUT},
             "description": "seconds to wait for the guest's eject (default 60)"},
            {"name": "force", "in": "query", "required": False, "schema": {"type": "boolean"},
             "description": "unplug without waiting for the guest: requests it has in flight are lost"}],
        "responses": {"204": {"description": "unplugged"}, "400": _FAULT, "default": _INTERNAL}}


OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/pyvmm/vcpus": {
        "put": {"operationId": "pyvmmSetVcpus",
                "summary": "pyvmm: plug vCPUs into the running VM or take them out (CPU hotplug, up to max_vcpus); "
                           "a removal waits for the guest to offline and eject the vCPU",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/PyvmmVcpus"}}}},
                "responses": {"204": {"description": "done"}, "400": _FAULT, "default": _INTERNAL}},
        "get": {"operationId": "pyvmmGetVcpus", "summary": "pyvmm: the running VM's vCPU count and maximum",
                "responses": {"200": {"description": "OK", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/PyvmmVcpuCount"}}}},
                    "400": _FAULT, "default": _INTERNAL}}},
    "/drives/{drive_id}": {"delete": _delete_operation("pyvmmDeleteDrive", "drive_id", "drive")},
    "/network-interfaces/{iface_id}": {"delete": _delete_operation("pyvmmDeleteNetworkInterface", "iface_id",
                                                                   "network interface")},
    "/vsock": {"delete": _delete_operation("pyvmmDeleteVsock", None, "vsock device")},
    "/entropy": {"delete": _delete_operation("pyvmmDeleteEntropyDevice", None, "entropy device (virtio-rng)")},
}


def openapi_schemas() -> dict[str, Any]:
    integer = {"type": "integer", "minimum": 1, "maximum": 255}
    return {"PyvmmVcpuCount": {"type": "object", "required": ["count", "max"],
                               "properties": {"count": integer, "max": integer}, "additionalProperties": False}}
