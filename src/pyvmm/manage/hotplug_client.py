"""Hotplug in the Python client: disks, NICs, the vsock and the entropy device plugged into a
managed VM and pulled out (console ports and the balloon: refused in one line, fixed at build).

`live`: the running VM (PUT/DELETE /drives/{id}, /network-interfaces/{id} on its API);
`config`: the definition, so the change outlives the VM's process (virsh's --live and
--config). Neither given: the running VM if it runs, else the definition. The definition is
written back as TOML (comments in a hand-written file are not kept).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import UserError
from . import definitions


class HotplugMethods:
    """Mixed into VmHandle (which provides `name`, `host`, `run` and `_live_api()`)."""

    def attach_disk(self, path: str | os.PathLike, *, drive_id: str | None = None, readonly: bool = False,
                    live: bool = False, config: bool = False) -> str:
        """Plug a raw disk image in; its drive id (default: the first free diskN)."""
        live, config = self._where(live, config)
        drive_id = drive_id or self._free_id("drives", "drive_id", "disk")
        drive = {"drive_id": drive_id, "path_on_host": os.path.abspath(path), "is_root_device": False,
                 "is_read_only": readonly}
        return self.attach_device({"drives": [drive]}, live=live, config=config)[0]

    def attach_interface(self, tap: str = "auto", *, iface_id: str | None = None, mac: str | None = None,
                         live: bool = False, config: bool = False) -> str:
        """Plug a NIC on TAP (auto: a TAP in a network namespace of its own) in; its interface id."""
        live, config = self._where(live, config)
        iface_id = iface_id or self._free_id("network-interfaces", "iface_id", "eth")
        interface: dict[str, Any] = {"iface_id": iface_id, "host_dev_name": tap}
        if mac:
            interface["guest_mac"] = mac
        return self.attach_device({"network-interfaces": [interface]}, live=live, config=config)[0]

    def attach_vsock(self, cid: int, uds_path: str | os.PathLike, *, live: bool = False, config: bool = False) -> str:
        """Plug the vsock device in (one per VM: the guest's CID; the host side at uds_path)."""
        return self.attach_device({"vsock": {"guest_cid": cid, "uds_path": os.path.abspath(uds_path)}},
                                  live=live, config=config)[0]

    def attach_rng(self, *, live: bool = False, config: bool = False) -> str:
        """Plug the entropy device (virtio-rng) in (one per VM)."""
        return self.attach_device({"entropy": {}}, live=live, config=config)[0]

    def detach_disk(self, drive_id: str, *, timeout: float = 60.0, force: bool = False, live: bool = False,
                    config: bool = False) -> None:
        self.detach_device({"drives": [{"drive_id": drive_id}]}, timeout=timeout, force=force, live=live,
                           config=config)

    def detach_interface(self, iface_id: str, *, timeout: float = 60.0, force: bool = False, live: bool = False,
                         config: bool = False) -> None:
        self.detach_device({"network-interfaces": [{"iface_id": iface_id}]}, timeout=timeout, force=force,
                           live=live, config=config)

    def attach_device(self, fragment: dict[str, Any], *, live: bool = False, config: bool = False) -> list[str]:
        """Plug in every device of a definition fragment (Firecracker's form: {"drives": [...],
        "network-interfaces": [...], "vsock": {...}, "entropy": {}}); their ids (vsock, entropy
        for those two)."""
        live, config = self._where(live, config)
        items = _items(fragment)
        if live:    # first: a device the VM refuses does not reach the definition
            api = self._live_api()  # type: ignore[attr-defined]
            for section, device_id, item in items:
                api.put(_api_path(section, device_id), item)
        if config:
            self._change_definition(lambda document: _add(document, items))
        return [device_id for _, device_id, _ in items]

    def detach_device(self, fragment: dict[str, Any], *, timeout: float = 60.0, force: bool = False,
                      live: bool = False, config: bool = False) -> None:
        """Unplug every drive and network interface a fragment names (by id); in the running VM
        this waits for the guest to eject each (`timeout` seconds; `force`: without waiting)."""
        live, config = self._where(live, config)
        items = _items(fragment, ids_only=True)
        if live:
            api = self._live_api()  # type: ignore[attr-defined]
            api.timeout = timeout + 30      # the answer comes once the guest has ejected the device
            for section, device_id, _ in items:
                query = f"?timeout={timeout:g}" + ("&force=true" if force else "")
                api.request("DELETE", _api_path(section, device_id) + query)
        if config:
            self._change_definition(lambda document: _remove(document, items))

    def set_vcpus(self, count: int, *, timeout: int = 60, live: bool = False, config: bool = False) -> None:
        """virsh setvcpus: the running VM plugs vCPUs in or takes them out (up to its max_vcpus;
        a removal waits `timeout` seconds for the guest); `config`: the definition's vcpu_count."""
        live, config = self._where(live, config)
        if live:
            api = self._live_api()  # type: ignore[attr-defined]
            current = api.get("/pyvmm/vcpus")["count"]
            api.timeout = timeout * max(1, current - count) + 60   # each removal waits for the guest
            api.put("/pyvmm/vcpus", {"count": count, "timeout": timeout})
        if config:
            def change(document: dict[str, Any]) -> None:
                document["machine-config"] = {**document.get("machine-config", {}), "vcpu_count": count}
            self._change_definition(change)

    def vcpus(self) -> dict[str, Any]:
        """The running VM's vCPU count and maximum."""
        return self._live_api().get("/pyvmm/vcpus")  # type: ignore[attr-defined]

    # --- helpers ---------------------------------------------------------------------------

    def _where(self, live: bool, config: bool) -> tuple[bool, bool]:
        if live or config:
            return live, config
        return (True, False) if self.run.pid() is not None else (False, True)  # type: ignore[attr-defined]

    def _free_id(self, section: str, id_key: str, prefix: str) -> str:
        taken: set[str] = set()
        if self.run.pid() is not None:  # type: ignore[attr-defined]
            taken |= {item[id_key] for item in self._live_api().get("/vm/config").get(section, [])}  # type: ignore[attr-defined]
        path = definitions.find(self.name, self.host.config_dir)  # type: ignore[attr-defined]
        if path is not None:
            taken |= {item.get(id_key) for item in definitions.load_file(path, self.name).document.get(section, [])}  # type: ignore[attr-defined]
        return next(f"{prefix}{n}" for n in range(len(taken) + 1) if f"{prefix}{n}" not in taken)

    def _change_definition(self, change) -> None:
        definition = definitions.load(self.name, self.host.config_dir)  # type: ignore[attr-defined]
        document = {key: (list(value) if isinstance(value, list) else value)
                    for key, value in definition.document.items()}
        change(document)
        changed = definitions.from_document(document, f"{self.name}'s definition", definition.name)  # type: ignore[attr-defined]
        definitions.store(changed, directory=self.host.config_dir, replace=True)  # type: ignore[attr-defined]


SINGLE = ("vsock", "entropy")   # one per VM: a table, not a list, named by its section
_SINGLE_NAMES = {"vsock": "a vsock device", "entropy": "an entropy device"}
UNPLUGGABLE = {"console_ports": "console ports", "balloon": "the balloon"}


def _items(fragment: Any, *, ids_only: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
    """(section, id, item) for each device of a fragment; one-line errors for the rest."""
    if not isinstance(fragment, dict):
        raise UserError("a device fragment is a table with drives, network-interfaces, vsock and/or entropy")
    for section in fragment:
        if section in UNPLUGGABLE or section == "console-ports":
            raise UserError(f"{section}: {UNPLUGGABLE.get(section, 'console ports')} cannot be attached or detached "
                            "(fixed when the machine is built: define it before the start)")
    unknown = sorted(set(fragment) - {"drives", "network-interfaces", *SINGLE})
    if unknown:
        raise UserError(f"{unknown[0]}: only drives, network-interfaces, vsock and entropy can be attached or detached")
    items = []
    for section, id_key in (("drives", "drive_id"), ("network-interfaces", "iface_id")):
        entries = fragment.get(section, [])
        if not isinstance(entries, list):
            raise UserError(f"{section} must be a list")
        for index, item in enumerate(entries):
            if not isinstance(item, dict) or not isinstance(item.get(id_key), str):
                raise UserError(f"{section}[{index}]: needs {id_key}")
            items.append((section, item[id_key], dict(item) if not ids_only else {id_key: item[id_key]}))
    for section in SINGLE:
        if section in fragment:
            if not isinstance(fragment[section], dict):
                raise UserError(f"{section} must be a table")
            items.append((section, section, dict(fragment[section]) if not ids_only else {}))
    if not items:
        raise UserError("the fragment names no drive, network interface, vsock or entropy device")
    return items


def _api_path(section: str, device_id: str) -> str:
    return f"/{section}" if section in SINGLE else f"/{section}/{device_id}"


def _add(document: dict[str, Any], items) -> None:
    for section, device_id, item in items:
        if section in SINGLE:
            if document.get(section) is not None:
                raise UserError(f"the definition has {_SINGLE_NAMES[section]} already (one per VM)")
            document[section] = item
            continue
        entries = document.setdefault(section, [])
        if any(entry.get(_ID_KEYS[section]) == device_id for entry in entries):
            raise UserError(f"{device_id!r}: the definition has that {section[:-1].replace('-', ' ')} already")
        entries.append(item)


def _remove(document: dict[str, Any], items) -> None:
    for section, device_id, _item in items:
        if section in SINGLE:
            if document.get(section) is None:
                raise UserError(f"the definition has no {section} device")
            del document[section]
            continue
        entries = document.get(section, [])
        kept = [entry for entry in entries if entry.get(_ID_KEYS[section]) != device_id]
        if len(kept) == len(entries):
            raise UserError(f"{device_id!r}: the definition has no such {section[:-1].replace('-', ' ')}")
        document[section] = kept


_ID_KEYS = {"drives": "drive_id", "network-interfaces": "iface_id"}
