"""Firecracker's balloon resources: /balloon and /balloon/statistics.

PUT /balloon configures the device before the VM starts; PATCH /balloon sets a new target
(amount_mib: memory taken from the guest) before or after; GET /balloon is the configuration
with the current target. After the start, PATCH /balloon/statistics changes how often the
guest's statistics are refreshed and GET /balloon/statistics reads them (Firecracker's names:
target_pages, actual_pages, target_mib, actual_mib, free_memory, available_memory, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .schema import BALLOON, BALLOON_STATS_UPDATE, BALLOON_UPDATE, check_body
from .states import NOT_STARTED, InvalidState

if TYPE_CHECKING:
    from .instance import VmInstance

DEVICE_ID = "virtio-balloon"
NO_BALLOON = "no balloon device: PUT /balloon before starting the VM"


def put(instance: "VmInstance", body: Any) -> None:
    checked = check_body(body, BALLOON)
    instance._configure(lambda spec: setattr(spec, "balloon", checked))


def get(instance: "VmInstance") -> dict[str, Any]:
    with instance.lock:
        if instance.spec.balloon is None:
            raise InvalidState(NO_BALLOON)
        return {"stats_polling_interval_s": 0, "free_page_hinting": False, "free_page_reporting": False,
                **instance.spec.balloon}


def _device(instance: "VmInstance"):
    vm = instance._require_vm()
    device = vm.devices.get(DEVICE_ID)
    if device is None:
        raise InvalidState(NO_BALLOON)
    return device


def patch(instance: "VmInstance", body: Any) -> None:
    """A new target, checked against the guest's memory; before the start it is the initial one."""
    amount = check_body(body, BALLOON_UPDATE)["amount_mib"]
    with instance.lock:
        if instance.spec.balloon is None:
            raise InvalidState(NO_BALLOON)
        memory_mib = instance.spec.machine["mem_size_mib"]
        if amount > memory_mib:
            raise ConfigError(f"{amount} MiB is more than the guest's {memory_mib} MiB", "amount_mib")
        if instance.state != NOT_STARTED:
            _device(instance).set_target_pages(amount << 8)  # MiB -> 4 KiB pages
        instance.spec.balloon = {**instance.spec.balloon, "amount_mib": amount}


def statistics(instance: "VmInstance") -> dict[str, Any]:
    with instance.lock:
        if instance.spec.balloon is None:
            raise InvalidState(NO_BALLOON)
        return _device(instance).statistics()


def patch_statistics(instance: "VmInstance", body: Any) -> None:
    interval = check_body(body, BALLOON_STATS_UPDATE)["stats_polling_interval_s"]
    with instance.lock:
        if instance.spec.balloon is None:
            raise InvalidState(NO_BALLOON)
        if instance.state != NOT_STARTED:
            _device(instance).set_stats_interval(interval)
        instance.spec.balloon = {**instance.spec.balloon, "stats_polling_interval_s": interval}
