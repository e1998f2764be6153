"""The API's OpenAPI 3 document, served at GET /openapi.json.

The paths are written out here as data; the request-body schemas are made from the same
field tables the server validates with (schema.RESOURCES), so a field cannot be accepted
by one and missing from the other. A test checks that every route the server implements
is documented here and that nothing documented here is missing from the server.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from . import hotplug, memory
from .schema import RESOURCES, Field

FIRECRACKER_API = "1.x (Firecracker's swagger: the resources both have, with the same fields, methods and codes)"

_FAULT = {"description": "bad input, or an operation the VM's state does not allow",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_INTERNAL = {"description": "internal error (a pyvmm bug)",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _get(operation: str, summary: str, schema: str, *, fault: bool = False) -> dict[str, Any]:
    responses = {"200": _json(schema), "default": _INTERNAL}
    if fault:
        responses["400"] = _FAULT
    return {"operationId": operation, "summary": summary, "responses": responses}


def _change(operation: str, summary: str, schema: str, *, path_param: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation, "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"204": {"description": "done"}, "400": _FAULT, "default": _INTERNAL},
    }
    if path_param:
        op["parameters"] = [{"name": path_param, "in": "path", "required": True, "schema": {"type": "string"}}]
    return op


PATHS: dict[str, dict[str, Any]] = {
    "/": {"get": _get("describeInstance", "Instance information (Firecracker)", "InstanceInfo")},
    "/version": {"get": _get("getFirecrackerVersion", "The VMM's version (Firecracker's field name)", "FirecrackerVersion")},
    "/machine-config": {
        "get": _get("getMachineConfiguration", "vCPUs and memory", "MachineConfiguration"),
        "put": _change("putMachineConfiguration", "Set the machine configuration. Pre-boot only.", "MachineConfiguration"),
        "patch": _change("patchMachineConfiguration", "Change some machine fields. Pre-boot only.", "MachineConfiguration"),
    },
    "/boot-source": {"put": _change("putGuestBootSource", "Kernel, initrd and command line. Pre-boot only. "
                                    "Without it pyvmm boots its default guest.", "BootSource")},
    "/drives/{drive_id}": {
        "put": _change("putGuestDriveByID", "Add or replace a drive before the boot; after it (pyvmm), plug a new "
                       "one into the running VM (PCI hotplug)", "Drive", path_param="drive_id"),
        "patch": _change("patchGuestDriveByID", "Change a drive's rate limiter (before or after boot; on a "
                         "running VM at once, buckets full) or its path (pyvmm: pre-boot only)", "PartialDrive",
                         path_param="drive_id"),
    },
    "/network-interfaces/{iface_id}": {
        "put": _change("putGuestNetworkInterfaceByID", "Add or replace a NIC before the boot; after it "
                       "(pyvmm), plug a new one in (PCI hotplug)", "NetworkInterface",
                       path_param="iface_id"),
        "patch": _change("patchGuestNetworkInterfaceByID", "Change a NIC's rate limiters (before or after boot; on "
                         "a running VM at once, buckets full)", "PartialNetworkInterface", path_param="iface_id")},
    "/vsock": {"put": _change("putGuestVsock", "The vsock device; after the boot (pyvmm), plug it into a running VM "
                              "that has none (PCI hotplug)", "Vsock")},
    "/entropy": {"put": _change("putEntropyDevice", "A virtio-rng device; after the boot (pyvmm), plug it into a "
                                 "running VM that has none (PCI hotplug)", "EntropyDevice")},
    "/balloon": {
        "put": _change("putBalloon", "A virtio-balloon device. Pre-boot only.", "Balloon"),
        "patch": _change("patchBalloon", "A new balloon target (amount_mib), before or after the start", "BalloonUpdate"),
        "get": _get("describeBalloonConfig", "The balloon's configuration and current target", "Balloon", fault=True)},
    "/balloon/statistics": {
        "get": _get("describeBalloonStats", "The balloon's target and actual size and the guest's memory statistics. "
                    "Post-boot only.", "BalloonStats", fault=True),
        "patch": _change("patchBalloonStatsInterval", "How often the guest's statistics are refreshed. Post-boot "
                         "(pyvmm: also before).", "BalloonStatsUpdate")},
    "/logger": {"put": _change("putLogger", "Send pyvmm's log to a file", "Logger")},
    "/metrics": {"put": _change("putMetrics", "Where FlushMetrics writes JSON metrics", "Metrics")},
    "/actions": {"put": _change("createSyncAction", "InstanceStart, SendCtrlAltDel (pyvmm: the ACPI power button), "
                                "FlushMetrics", "InstanceActionInfo")},
    "/vm": {"patch": _change("patchVm", "Pause or resume the VM", "Vm")},
    "/snapshot/create": {"put": _change("createSnapshot", "Write a Full or Diff snapshot of the paused VM (a state "
                                        "file and a sparse memory file). Post-boot only; the VM must be paused.",
                                        "SnapshotCreateParams")},
    "/snapshot/load": {"put": _change("loadSnapshot", "Load a snapshot into this fresh VM (before InstanceStart and "
                                      "before any resource but the logger and metrics is configured). pyvmm's "
                                      "restore_mode says how a File backend is loaded.", "SnapshotLoadParams")},
    "/vm/config": {"get": _get("getExportVmConfig", "The whole configuration", "FullVmConfiguration")},
    "/openapi.json": {"get": {"operationId": "getOpenApi", "summary": "This document",
                              "responses": {"200": {"description": "OpenAPI 3 document",
                                                    "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    "/pyvmm/status": {"get": _get("pyvmmStatus", "pyvmm: state (Not started, Running, Paused, Stopped), "
                                  "pid, boots, and the outcome once stopped", "PyvmmStatus")},
    "/pyvmm/devices": {"get": _get("pyvmmDevices", "pyvmm: the device tree (id, kind, transport, resources)",
                                   "PyvmmDevices", fault=True)},
    "/pyvmm/stats": {"get": _get("pyvmmStats", "pyvmm: per vCPU exits by reason and interrupts injected, vCPU and "
                                 "process CPU time, per-device counters, guest RAM resident and VMM overhead",
                                 "PyvmmStats")},
    "/pyvmm/console": {"get": {
        "operationId": "pyvmmConsole", "summary": "pyvmm: the console history (the last 256 KiB the guest printed)",
        "parameters": [{"name": "tail", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
                        "description": "only the last TAIL bytes"}],
        "responses": {"200": {"description": "raw console bytes",
                              "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                      "400": _FAULT, "default": _INTERNAL}}},
    "/pyvmm/actions": {"put": _change("pyvmmAction", "pyvmm: Stop (destroy), Reboot, Shutdown (power button)",
                                      "PyvmmAction")},
    "/pyvmm/migration": {
        "put": _change("pyvmmMigrate", "pyvmm: start a live migration (pre-copy) to a destination waiting at "
                       "unix:PATH or tcp:HOST:PORT (a VM started with --incoming). Answers at once; follow it with "
                       "GET. On success the VM stops here with outcome 'migrated'; on failure it runs on here.",
                       "PyvmmMigration"),
        "get": _get("pyvmmMigrationProgress", "pyvmm: the last migration's progress: status, round, bytes sent, "
                    "dirty pages left, dirty rate, and at the end total time and downtime", "PyvmmMigrationProgress",
                    fault=True)},
    "/pyvmm/migration/cancel": {"put": {
        "operationId": "pyvmmCancelMigration", "summary": "pyvmm: cancel the migration under way (the VM runs on here)",
        "responses": {"204": {"description": "done"}, "400": _FAULT, "default": _INTERNAL}}},
    "/pyvmm/agent/exec": {"put": {
        "operationId": "pyvmmAgentExec",
        "summary": "pyvmm: run a command in the guest through its agent (vsock port 52; the VM needs a vsock "
                   "device). 200 whatever the command's exit status; 400 if no agent answers.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AgentExec"}}}},
        "responses": {"200": _json("AgentExecResult"), "400": _FAULT, "default": _INTERNAL}}},
    "/pyvmm/agent/files": {
        "get": {"operationId": "pyvmmAgentReadFile", "summary": "pyvmm: a guest file's contents, through the agent",
                "parameters": [{"name": "path", "in": "query", "required": True, "schema": {"type": "string"},
                                "description": "the guest file"},
                               {"name": "connect_timeout", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 60},
                                "description": "seconds to wait for the agent (default 10)"}],
                "responses": {"200": {"description": "the file's bytes", "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                    "400": _FAULT, "default": _INTERNAL}},
        "put": _change("pyvmmAgentWriteFile", "pyvmm: create or replace a guest file, through the agent",
                       "AgentFile"),
    },
}
PATHS.update(memory.OPENAPI_PATHS)  # the memory inspector (api/memory.py)
for _path, _operations in hotplug.OPENAPI_PATHS.items():  # DELETE on drives and NICs (api/hotplug.py)
    PATHS.setdefault(_path, {}).update(_operations)


def _field_schema(field: Field) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": field.type}
    if field.description:
        schema["description"] = field.description
    for key in ("enum", "minimum", "maximum", "default"):
        value = getattr(field, key)
        if value is not None:
            schema[key] = list(value) if key == "enum" else value
    if field.type == "array" and field.items:
        schema["items"] = {"type": field.items}
    if field.type == "object":
        if field.ref is not None:  # its fields, inline
            schema.update(_object(RESOURCES[field.ref]))
        schema["nullable"] = True
    return schema


def _object(fields: tuple[Field, ...]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": {f.name: _field_schema(f) for f in fields}}
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _plain(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def schemas() -> dict[str, Any]:
    result = {name: _object(fields) for name, fields in RESOURCES.items()}
    for schema, name in (("AgentExec", "stdin"), ("AgentFile", "content")):  # bytes, as base64
        result[schema]["properties"][name]["format"] = "byte"
    result["AgentExec"]["properties"]["env"]["additionalProperties"] = {"type": "string"}
    string, integer, number = {"type": "string"}, {"type": "integer"}, {"type": "number"}
    result.update({
        "Error": _plain({"fault_message": string}),
        "InstanceInfo": _plain({"app_name": string, "id": string, "vmm_version": string,
                                "state": {"type": "string", "enum": ["Not started", "Running", "Paused"]}},
                               ("app_name", "id", "state", "vmm_version")),
        "FirecrackerVersion": _plain({"firecracker_version": string}, ("firecracker_version",)),
        "FullVmConfiguration": _plain({
            "machine-config": _ref("MachineConfiguration"), "boot-source": _ref("BootSource"),
            "drives": {"type": "array", "items": _ref("Drive")},
            "network-interfaces": {"type": "array", "items": _ref("NetworkInterface")},
            "vsock": _ref("Vsock"), "entropy": _ref("EntropyDevice"), "logger": _ref("Logger"),
            "metrics": _ref("Metrics"), "pyvmm": _ref("PyvmmOptions"), "balloon": _ref("Balloon")}),
        "PyvmmStatus": _plain({
            "id": string,
            "state": {"type": "string", "enum": ["Not started", "Incoming", "Running", "Paused", "Stopped"]},
            "pid": integer, "boots": integer, "started_at": {"type": "number", "nullable": True},
            "incoming": {"type": "string", "nullable": True,
                         "description": "where a VM started with --incoming waits for its migration"},
            "outcome": {"type": "object", "nullable": True,
                        "properties": {"reason": string, "status": integer, "message": string}}},
            ("id", "state", "pid")),
        "PyvmmDevices": {"type": "array", "items": _plain({"id": string, "kind": string, "transport": string,
                                                           "parent": {"type": "string", "nullable": True},
                                                           "resources": {"type": "object"}}, ("id", "kind"))},
        "PyvmmMigrationProgress": _plain({
            "status": {"type": "string", "enum": ["setup", "precopy", "stop-and-copy", "completing", "completed",
                                                  "failed", "cancelled"]},
            "mode": {"type": "string", "enum": ["precopy", "stop-and-copy"]}, "address": string,
            "round": integer, "bytes_sent": integer, "pages_sent": integer, "zero_pages": integer,
            "ram_bytes": integer, "remaining_pages": integer, "dirty_rate": number, "rate": number,
            "elapsed_s": number, "downtime_ms": {"type": "number", "nullable": True},
            "total_s": {"type": "number", "nullable": True}, "error": {"type": "string", "nullable": True},
            "history": {"type": "array", "items": {"type": "object"}},
            "phases": {"type": "object", "additionalProperties": number,
                       "description": "where the downtime went, in ms (MigrationProgress.phases)"}},
            ("status", "round", "bytes_sent")),
        "PyvmmStats": _stats_schema(),
        "BalloonStats": _plain({name: integer for name in (
            "target_pages", "actual_pages", "target_mib", "actual_mib", "swap_in", "swap_out", "major_faults",
            "minor_faults", "free_memory", "total_memory", "available_memory", "disk_caches", "hugetlb_allocations",
            "hugetlb_failures")}, ("target_pages", "actual_pages", "target_mib", "actual_mib")),
        "AgentExecResult": _plain({"exit_status": {**integer, "description": "the exit code, or 128 + the signal"},
                                   "signal": {**integer, "description": "the signal that killed it, else 0"},
                                   "stdout": {"type": "string", "format": "byte"},
                                   "stderr": {"type": "string", "format": "byte"}},
                                  ("exit_status", "signal", "stdout", "stderr")),
    })
    result.update(memory.openapi_schemas())
    result.update(hotplug.openapi_schemas())
    return result


def _stats_schema() -> dict[str, Any]:
    string, integer, number = {"type": "string"}, {"type": "integer"}, {"type": "number"}
    maybe_int, maybe_number = {"type": "integer", "nullable": True}, {"type": "number", "nullable": True}
    by_reason = {"type": "object", "additionalProperties": integer,
                 "description": "VM exits by reason: KVM's binary stats names (io, mmio, halt, irq_window...) on "
                                "KVM, the translator loop's (slices, port_io, mmio, interrupts...) on the software CPU"}
    counter = {"anyOf": [integer, {"type": "boolean"}, {"type": "object"}]}
    return _plain({
        "state": string, "uptime_s": maybe_number, "vcpu_count": integer,
        "cpu_user_s": number, "cpu_system_s": number, "rss_bytes": maybe_int, "console_bytes": integer,
        "vcpus": {"type": "array", "items": _plain({"index": integer, "exits": by_reason, "exits_total": integer,
                                                    "interrupts_injected": maybe_int}, ("index", "exits"))},
        "exits": by_reason, "exits_total": integer,
        "exits_source": {"type": "string", "nullable": True, "enum": ["kvm-binary-stats", "pyvmm", "software-cpu", None],
                         "description": "where exits come from: KVM's stats fd, pyvmm's own count of the exits KVM "
                                        "hands it, or the software CPU's loop"},
        "interrupts_injected": {**maybe_int, "description": "interrupts and NMIs delivered; null where unknown"},
        "vcpu_threads": {"type": "array", "items": _plain({"label": string, "cpu_s": maybe_number})},
        "vcpu_time_s": {**number, "description": "CPU time of the threads that run the vCPUs"},
        "devices": {"type": "object", "description": "per virtio device (by id)",
                    "additionalProperties": {
                        "type": "object", "additionalProperties": counter,
                        "properties": {"kind": string, "requests": integer, "malformed_chains": integer,
                                       "ring_failures": integer, "needs_reset": {"type": "boolean"}},
                        "required": ["kind", "requests", "malformed_chains", "ring_failures", "needs_reset"]}},
        "memory": _plain({"guest_ram_bytes": integer, "guest_ram_resident_bytes": integer,
                          "process_rss_bytes": maybe_int, "vmm_overhead_bytes": maybe_int,
                          "huge_pages": {"type": "string", "enum": ["none", "2M", "transparent"]},
                          "ksm": {"type": "boolean"},
                          "ksm_merging_pages": {**maybe_int, "description": "this process's pages KSM merged"},
                          "balloon_target_bytes": integer, "balloon_actual_bytes": integer,
                          "guest_free_bytes": maybe_int, "guest_available_bytes": maybe_int,
                          "guest_cached_bytes": maybe_int, "guest_total_bytes": maybe_int},
                         ("guest_ram_bytes", "guest_ram_resident_bytes")),
    }, ("state", "vcpu_count", "exits", "exits_total", "vcpus", "devices", "memory"))


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "pyvmm per-VM API", "version": __version__,
                 "description": "One pyvmm VM's API, served on a Unix socket in the VM's own process. A superset of "
                                f"Firecracker's REST API {FIRECRACKER_API}; pyvmm's own resources are under /pyvmm/. "
                                "Errors are {\"fault_message\": ...} with status 400 (bad input: the message names the "
                                "field), 404 (no such path) or 405 (wrong method). Requests that change the VM are "
                                "serialised: one runs at a time, in arrival order."},
        "servers": [{"url": "http://localhost", "description": "over the VM's Unix socket (api.sock)"}],
        "paths": PATHS,
        "components": {"schemas": schemas()},
    }
