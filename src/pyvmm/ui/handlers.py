"""What the UI's JSON requests do, over the managed-VM client (manage.client): the UI keeps no
state of its own. Lists and details are read from the control plane's records and each VM's
API at request time; rates (CPU %, exits/s, throughput) are the page's business: it keeps
the cumulative counters it polled and draws their differences.

Snapshots taken from the page are files in a directory per VM, SNAPSHOTS/NAME/LABEL.state
and LABEL.state.mem (SNAPSHOTS: $XDG_DATA_HOME/pyvmm/snapshots), the same files
`pyvmm snapshot` writes and `pyvmm restore` reads.
"""

from __future__ import annotations

import http.client
import os
import re
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..manage.client import ACTIVE, PAUSED, RUNNING, ApiError, Host, VmHandle, VmInfo
from ..manage.records import UnknownVm, check_name
from ..manage.top import io_totals
from .forms import document_from_form

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ACCELERATORS = {"software-cpu": "tcg", "kvm-binary-stats": "kvm", "pyvmm": "kvm"}
ACTIONS = ("start", "shutdown", "destroy", "suspend", "resume", "reboot", "clone", "delete")


class Unreachable(UserError):
    """The VM's sockets exist but this user cannot connect to them: the UI will not act on it."""


class Conflict(UserError):
    """The VM is not in a state that allows the request."""


def snapshot_root() -> Path:
    data = os.environ.get("XDG_DATA_HOME")
    base = Path(data) if data and os.path.isabs(data) else Path.home() / ".local" / "share"
    return base / "pyvmm" / "snapshots"


def require_reachable(vm: VmHandle) -> None:
    """Refuse a VM whose API or console socket exists but is not this user's to use."""
    for path in (vm.run.api_sock, vm.run.console_sock):
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise Unreachable(f"{vm.name}: cannot reach its socket {path} (permission denied): the UI acts "
                              "only on VMs its user can reach")


def _summary(info: VmInfo) -> dict[str, Any]:
    return {"name": info.name, "state": info.state, "pid": info.pid, "vcpus": info.vcpus,
            "memory_mib": info.memory_mib, "uptime_s": info.uptime_s, "outcome": info.outcome,
            "defined": info.defined, "active": info.active}


def _live_stats(vm: VmHandle, info: VmInfo) -> dict[str, Any] | None:
    if info.state not in (RUNNING, PAUSED):
        return None
    try:
        stats = vm.stats()
    except (OSError, UserError, http.client.HTTPException):  # it stopped between the two reads
        return None
    stats["cpu_s"] = stats.get("cpu_user_s", 0) + stats.get("cpu_system_s", 0)
    stats["io"] = io_totals(stats)
    stats["accel"] = ACCELERATORS.get(stats.get("exits_source") or "", None)
    return stats


def list_vms(host: Host) -> dict[str, Any]:
    """Every VM (shut off ones too), with the counters the list's graphs need."""
    rows = []
    for info in host.list(all=True):
        row = _summary(info)
        stats = _live_stats(VmHandle(host, info.name), info)
        if stats is not None:
            row["stats"] = {key: stats.get(key) for key in ("cpu_s", "exits_total", "vcpu_time_s", "rss_bytes",
                                                             "accel")}
        rows.append(row)
    return {"time": time.time(), "vms": rows}


def vm_detail(host: Host, name: str, snapshots: Path) -> dict[str, Any]:
    vm = host.vm(name)
    info = vm.info()
    detail = _summary(info)
    detail["time"] = time.time()
    detail["stats"] = _live_stats(vm, info)
    detail["definition"] = _definition_text(info)
    detail["devices"], detail["config"], detail["api_paths"] = None, None, {}
    if detail["stats"] is not None:
        try:
            require_reachable(vm)
            detail["devices"] = vm.devices()
            detail["config"] = vm.config()
            detail["api_paths"] = _api_operations(vm)
        except (OSError, ApiError, http.client.HTTPException, Unreachable):
            pass
    detail["capabilities"] = capabilities(detail["api_paths"], detail["config"])
    for key, capability, path in (("virtio_mem", "virtio_mem", "/pyvmm/memory/virtio-mem"),  # region, plugged...
                                  ("vcpu_hotplug", "vcpus", "/pyvmm/vcpus")):           # count and maximum
        detail[key] = None
        if detail["capabilities"][capability]:
            try:
                detail[key] = vm.api.get(path)
            except (OSError, ApiError, http.client.HTTPException):
                pass
    detail["snapshots"] = list_snapshots(snapshots, name)
    detail["events"] = recorded_events(vm, info)
    return detail


def _api_operations(vm: VmHandle) -> dict[str, list[str]]:
    """The VM's API as its OpenAPI document describes it: path -> methods (upper case)."""
    paths = (vm.api.get("/openapi.json") or {}).get("paths", {})
    return {path: sorted(method.upper() for method in operations) for path, operations in paths.items()}


# What the page's controls may ask of a VM's API, and only when the VM's API offers it.
CONTROLS = {("PATCH", "/balloon"), ("PUT", "/pyvmm/memory/virtio-mem"), ("PUT", "/pyvmm/vcpus"), ("PUT", "/drives/{drive_id}"), ("DELETE", "/drives/{drive_id}"),
            ("PUT", "/network-interfaces/{iface_id}"), ("DELETE", "/network-interfaces/{iface_id}")}
_CONCRETE = ((re.compile(r"^/drives/([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})$"), "/drives/{drive_id}"),
             (re.compile(r"^/network-interfaces/([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})$"), "/network-interfaces/{iface_id}"))


def capabilities(operations: dict[str, list[str]], config: dict[str, Any] | None) -> dict[str, bool]:
    """Controls the page shows because the VM's API offers them (its OpenAPI document) and
    the VM has the device they act on."""
    def offers(method: str, path: str) -> bool:
        return method in operations.get(path, [])

    return {"balloon": offers("PATCH", "/balloon") and bool((config or {}).get("balloon")),
            "virtio_mem": offers("PUT", "/pyvmm/memory/virtio-mem") and
            bool(((config or {}).get("pyvmm") or {}).get("virtio_mem_mib")),
            "vcpus": offers("PUT", "/pyvmm/vcpus") and offers("GET", "/pyvmm/vcpus"),  # CPU hotplug
            # hotplug: a running VM's drives and NICs can be removed, and so added
            "disk_hotplug": offers("DELETE", "/drives/{drive_id}"),
            "nic_hotplug": offers("DELETE", "/network-interfaces/{iface_id}")}


def vm_control(host: Host, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """One request of the VM page's controls to the VM's API (CONTROLS, where the VM offers it)."""
    method, path, payload = body.get("method"), body.get("path"), body.get("body")
    if not isinstance(method, str) or not isinstance(path, str):
        raise UserError("a control request needs method and path")
    template = path
    for pattern, generic in _CONCRETE:
        if pattern.match(path):
            template = generic
    if (method, template) not in CONTROLS:
        raise UserError(f"{method:.10} {path:.80} is not a control of this page")
    vm = host.vm(name)
    require_reachable(vm)
    if vm.run.pid() is None:
        raise Conflict(f"{name} is not running")
    if method not in _api_operations(vm).get(template, []):
        raise Conflict(f"{name}'s API does not offer {method} {template}")
    vm.api.request(method, path, payload)
    return {"name": name}


def _definition_text(info: VmInfo) -> str | None:
    if info.definition is None:
        return None
    try:
        return info.definition.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def recorded_events(vm: VmHandle, info: VmInfo) -> list[dict[str, Any]]:
    """What the records say happened (the page adds the changes it sees while it is open)."""
    events = []
    if info.uptime_s is not None:
        events.append({"time": time.time() - info.uptime_s, "text": "started"})
    outcome = vm.run.outcome() if info.pid is None else None
    if info.outcome and not info.active:
        when = (outcome or {}).get("ended_at")
        events.append({"time": when, "text": f"{info.state}: {info.outcome.get('reason')}: "
                                             f"{info.outcome.get('message')}"})
    return events


def vm_action(host: Host, name: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
    if action not in ACTIONS:
        raise UserError(f"unknown action {action!r:.40} (known: {', '.join(ACTIONS)})")
    vm = host.vm(name)
    require_reachable(vm)
    if action == "start":
        vm.start()
    elif action == "suspend":
        vm.suspend()
    elif action == "resume":
        vm.resume()
    elif action == "reboot":
        vm.reboot()
    elif action == "destroy":
        vm.destroy()
    elif action == "shutdown":  # the power button; the page sees the guest power off when it does
        if vm.run.pid() is None:
            raise Conflict(f"{name} is not running")
        vm.api.put("/pyvmm/actions", {"action_type": "Shutdown"})
    elif action == "clone":
        new_name = body.get("new_name")
        if not isinstance(new_name, str):
            raise UserError("clone needs new_name")
        vm.clone(new_name)
        return {"name": new_name}
    elif action == "delete":
        if vm.info().active:
            raise Conflict(f"{name} is running: destroy or shut it down first")
        vm.undefine()
    return {"name": name, "state": vm.state() if action != "delete" else None}


def console_history(host: Host, name: str) -> bytes:
    """Everything the guest printed (the running VM's ring, else its console log)."""
    vm = host.vm(name)
    require_reachable(vm)
    return vm.console_history()


def create_vm(host: Host, form: dict[str, Any]) -> dict[str, Any]:
    name, document = document_from_form(form)
    vm = host.create(document, name)
    return {"name": vm.name, "state": vm.state()}


# --- snapshots ------------------------------------------------------------------------------

def _snapshot_dir(root: Path, name: str) -> Path:
    return root / check_name(name)


def _snapshot_file(root: Path, name: str, label: str) -> Path:
    if not LABEL.match(label or ""):
        raise UserError(f"{label!r:.60} is not a snapshot label: 1-64 letters, digits, '_', '.', '-'")
    return _snapshot_dir(root, name) / f"{label}.state"


def list_snapshots(root: Path, name: str) -> list[dict[str, Any]]:
    directory = _snapshot_dir(root, name)
    if not directory.is_dir():
        return []
    rows = []
    for state in sorted(directory.glob("*.state")):
        if state.name.startswith("."):  # one being written
            continue
        memory = state.with_name(state.name + ".mem")
        try:
            stat = state.stat()
            size = stat.st_size + (memory.stat().st_size if memory.exists() else 0)
        except OSError:
            continue
        rows.append({"label": state.name[:-len(".state")], "path": str(state), "taken_at": stat.st_mtime,
                     "bytes": size})
    return sorted(rows, key=lambda row: row["taken_at"])


def take_snapshot(host: Host, root: Path, name: str, label: str) -> dict[str, Any]:
    vm = host.vm(name)
    require_reachable(vm)
    path = _snapshot_file(root, name, label)
    if path.exists():
        raise Conflict(f"{name} has a snapshot labelled {label!r} already")
    if vm.info().state not in (RUNNING, PAUSED):
        raise Conflict(f"{name} is not running: a snapshot is taken of a running or paused VM")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # written under a hidden name, listed only once whole
    partial = path.with_name(f".{path.name}.partial")
    try:
        vm.snapshot(partial, mem_file=partial.with_name(partial.name + ".mem"))
        partial.with_name(partial.name + ".mem").replace(path.with_name(path.name + ".mem"))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
        partial.with_name(partial.name + ".mem").unlink(missing_ok=True)
    return {"label": label, "path": str(path)}


def restore_snapshot(host: Host, root: Path, name: str, label: str) -> dict[str, Any]:
    """The VM continues from the snapshot: a running VM is stopped first (virsh snapshot-revert)."""
    vm = host.vm(name)
    require_reachable(vm)
    path = _snapshot_file(root, name, label)
    if not path.exists():
        raise UnknownVm(f"{name} has no snapshot labelled {label!r}")
    if vm.info().state in ACTIVE:
        vm.destroy()
    host.restore(path, name=name)
    return {"name": name, "state": vm.state()}


def delete_snapshot(root: Path, name: str, label: str) -> None:
    path = _snapshot_file(root, name, label)
    if not path.exists():
        raise UnknownVm(f"{name} has no snapshot labelled {label!r}")
    path.with_name(path.name + ".mem").unlink(missing_ok=True)
    path.unlink()
