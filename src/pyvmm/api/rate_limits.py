"""PATCH /drives/{id} and PATCH /network-interfaces/{id}: rate limiters (Firecracker's form),
before boot into the configuration, on a running or paused VM at once into the device too.

A PATCH changes what it names, as Firecracker's does: a bucket left out keeps its setting, a
bucket with size or refill_time 0 (or null) is removed, and `rate_limiter: null` removes both.
A drive's path can change only before boot. The configuration keeps the limiter in force, so
GET /vm/config and a snapshot's configuration document show it; the device's saved state
carries it (with its buckets' levels) through a snapshot or a migration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, UserError
from .schema import PARTIAL_DRIVE, PARTIAL_NETWORK_INTERFACE, check_body, rate_limit
from .states import NOT_STARTED, PAUSED, RUNNING, InvalidState

if TYPE_CHECKING:
    from .instance import VmInstance

LIVE = (RUNNING, PAUSED)


def patch_drive(instance: VmInstance, drive_id: str, body: Any) -> None:
    checked = check_body(body, PARTIAL_DRIVE)
    _same_id(checked, "drive_id", drive_id)
    rate_limit(checked, "rate_limiter")
    with instance.lock:
        drive = instance.spec.drives.get(drive_id)
        if drive is None:
            raise ConfigError(f"{drive_id!r}: no such drive", "drive_id")
        if "rate_limiter" in checked:
            checked["rate_limiter"] = merged(drive.get("rate_limiter"), checked["rate_limiter"])
            limit = rate_limit(checked, "rate_limiter")
            if limit is not None and "socket" in drive:
                raise ConfigError("is not for a vhost-user drive (socket): its back-end does the I/O", "rate_limiter")
        if instance.state == NOT_STARTED:
            instance.configure(lambda spec: spec.drives[drive_id].update(checked))
            return
        if "path_on_host" in checked:
            raise UserError("changing a drive's path on a started VM is not supported by pyvmm yet")
        if instance.state not in LIVE:
            raise InvalidState("the VM is not running")
        if "rate_limiter" not in checked:
            return
        device = _device(instance, drive_id, drive_id)   # a drive's device-tree id is its drive id
        device.set_rate_limit(limit)
        drive["rate_limiter"] = checked["rate_limiter"]


def patch_interface(instance: VmInstance, iface_id: str, body: Any) -> None:
    checked = check_body(body, PARTIAL_NETWORK_INTERFACE)
    _same_id(checked, "iface_id", iface_id)
    names = ("rx_rate_limiter", "tx_rate_limiter")
    for name in names:
        rate_limit(checked, name)
    with instance.lock:
        iface = instance.spec.interfaces.get(iface_id)
        if iface is None:
            raise ConfigError(f"{iface_id!r}: no such network interface", "iface_id")
        for name in names:
            if name in checked:
                checked[name] = merged(iface.get(name), checked[name])
        if instance.state == NOT_STARTED:
            instance.configure(lambda spec: spec.interfaces[iface_id].update(checked))
            return
        if instance.state not in LIVE:
            raise InvalidState("the VM is not running")
        device = _device(instance, iface_id, iface_id)   # a NIC's device-tree id is its iface id
        new = {**iface, **checked}   # a direction the request leaves out keeps its limit
        device.set_rate_limits(rate_limit(new, "rx_rate_limiter"), rate_limit(new, "tx_rate_limiter"))
        iface.update(checked)


def merged(current: dict[str, Any] | None, change: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rate limiter (API form) with a PATCH's buckets applied: those it names replace (null or a
    zero size/refill_time removes one), the others stay; a null change removes the whole limiter."""
    if change is None:
        return None
    result = {**(current or {}), **change}
    return {name: bucket for name, bucket in result.items()
            if bucket is not None and bucket.get("size") and bucket.get("refill_time")} or None


def _same_id(checked: dict[str, Any], key: str, path_id: str) -> None:
    if checked[key] != path_id:
        raise ConfigError(f"{checked[key]!r} differs from the id in the path ({path_id!r})", key)


def _device(instance: VmInstance, name: str, what: str) -> Any:
    vm = instance.vm
    device = None if vm is None else vm.devices.get(name)
    if device is None:
        raise InvalidState(f"{what!r} has no device in the running VM")
    return device
