"""The Create page's form: its fields -> a VM definition, checked as the API checks one.

The document is validated by the schema that checks definitions and API requests
(api/schema.py VmSpec), and host files are looked at as the API's PUT /boot-source and
PUT /drives do; each error is reported against the form field that holds the value, with
the API's own message.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..api.schema import VmSpec
from ..errors import ConfigError, UserError
from ..manage.records import check_name

FIELDS = ("name", "vcpus", "memory", "source", "kernel", "initrd", "append", "kernel_args", "root_disk", "disk",
          "net", "accel", "rng", "balloon", "virtio_mem")
ROOT_DRIVE, DATA_DRIVE = "rootfs", "disk0"


class FormError(UserError):
    """A form field's value is refused: `field` is the form's name for it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _text(form: dict[str, Any], key: str) -> str:
    value = form.get(key, "")
    return value.strip() if isinstance(value, str) else str(value)


def _number(form: dict[str, Any], key: str) -> Any:
    """An integer when the text is one; otherwise the text itself, for the schema to refuse in its words."""
    text = _text(form, key)
    if not text:
        raise FormError(key, "is required")
    return int(text) if re.fullmatch(r"-?\d{1,12}", text) else text


def document_from_form(form: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, definition document) for a submitted form; FormError names the field at fault."""
    unknown = sorted(set(form) - set(FIELDS))
    if unknown:
        raise FormError(unknown[0], "is not a field of this form")
    name = _text(form, "name")
    if not name:
        raise FormError("name", "is required")
    try:
        check_name(name)
    except UserError as exc:
        raise FormError("name", str(exc)) from None
    document: dict[str, Any] = {"machine-config": {"vcpu_count": _number(form, "vcpus"),
                                                   "mem_size_mib": _number(form, "memory")}}
    source = _text(form, "source") or "default"
    if source == "kernel":
        kernel = _text(form, "kernel")
        if not kernel:
            raise FormError("kernel", "is required for a kernel you name (or choose pyvmm's default guest)")
        boot = {"kernel_image_path": kernel}
        if _text(form, "initrd"):
            boot["initrd_path"] = _text(form, "initrd")
        if _text(form, "append"):
            boot["boot_args"] = _text(form, "append")
        document["boot-source"] = boot
    elif source != "default":
        raise FormError("source", f"must be default or kernel (got {source!r:.40})")
    drives = []
    if _text(form, "root_disk"):
        drives.append({"drive_id": ROOT_DRIVE, "path_on_host": _text(form, "root_disk"), "is_root_device": True,
                       "is_read_only": False})
    if _text(form, "disk"):
        drives.append({"drive_id": DATA_DRIVE, "path_on_host": _text(form, "disk"), "is_root_device": False,
                       "is_read_only": False})
    if drives:
        document["drives"] = drives
    if _text(form, "net"):
        document["network-interfaces"] = [{"iface_id": "eth0", "host_dev_name": _text(form, "net")}]
    if form.get("rng") in (True, "on", "true", "1"):
        document["entropy"] = {}
    if form.get("balloon") in (True, "on", "true", "1"):  # empty to begin with; the VM page sets its target
        document["balloon"] = {"amount_mib": 0, "deflate_on_oom": True, "stats_polling_interval_s": 2,
                               "free_page_reporting": True}
    options: dict[str, Any] = {"accel": _text(form, "accel") or None,
                               "kernel_args": _text(form, "kernel_args") or None,
                               "virtio_mem_mib": _number(form, "virtio_mem") if _text(form, "virtio_mem") else None}
    if options["kernel_args"] and source == "kernel":
        raise FormError("kernel_args", "is for pyvmm's default guest: with a kernel of your own, use its command line")
    if any(value is not None for value in options.values()):
        document["pyvmm"] = {key: value for key, value in options.items() if value}
    try:
        VmSpec.from_document(document)
    except ConfigError as exc:
        raise FormError(form_field(exc.field, drives), exc.detail.lstrip(": ")) from None
    # host files are looked at when they are configured, as the API's PUT /boot-source and /drives do
    for field, path in (("kernel", document.get("boot-source", {}).get("kernel_image_path")),
                        ("initrd", document.get("boot-source", {}).get("initrd_path")),
                        *((form_field(f"drives[{d['drive_id']}]", drives), d["path_on_host"]) for d in drives)):
        if path is not None and not os.path.isfile(path):
            raise FormError(field, f"{path!r:.200}: no such file")
    return name, document


_PREFIXES = (("machine-config.vcpu_count", "vcpus"), ("machine-config.mem_size_mib", "memory"),
             ("boot-source.kernel_image_path", "kernel"), ("boot-source.initrd_path", "initrd"),
             ("boot-source.boot_args", "append"), ("pyvmm.kernel_args", "kernel_args"), ("pyvmm.accel", "accel"),
             ("pyvmm.virtio_mem_mib", "virtio_mem"),
             ("network-interfaces", "net"), ("entropy", "rng"), ("balloon", "balloon"), (f"drives[{ROOT_DRIVE}]", "root_disk"),
             (f"drives[{DATA_DRIVE}]", "disk"))


def form_field(field: str | None, drives: list[dict[str, Any]]) -> str:
    """The form field holding a document field ('machine-config.mem_size_mib' -> 'memory')."""
    if field is None:
        return "name"
    match = re.match(r"drives\[(\d+)\]", field)
    if match and int(match.group(1)) < len(drives):
        field = f"drives[{drives[int(match.group(1))]['drive_id']}]"
    for prefix, name in _PREFIXES:
        if field.startswith(prefix):
            return name
    return "name"
