"""The memory inspector over the per-VM API: GET /pyvmm/memory/translate and /pyvmm/memory/read.

It runs in the VM's own process, which owns guest RAM and the vCPUs' registers. A running VM
is paused for the few milliseconds a request takes (the vCPU's CR0/CR3/CR4/EFER and the page
tables are read together, as one moment of the guest) and resumed after; a paused VM stays
paused. The walk (arch/x86_64/page_walk.py) never writes guest memory. Guest-physical ->
host-virtual is the RAM region's mapping in this process; host-virtual -> host-physical comes
from /proc/self/pagemap (memory/pagemap.py). On KVM the walk is checked against KVM's own
(KVM_TRANSLATE).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from ..arch.x86_64.page_walk import walk
from ..arch.x86_64.paging import PagingMode
from ..errors import ConfigError, UserError
from ..memory.pagemap import host_page
from .schema import Field, check_body
from .states import InvalidState

if TYPE_CHECKING:
    from .instance import VmInstance

MAX_READ = 1 << 20  # bytes one read may return


class NotMapped(UserError):
    """A guest address that leads to no guest RAM."""


def parse_address(text: str | None, field: str) -> int:
    """A 64-bit address written in hex (0x...) or decimal."""
    if text is None or not text.strip():
        raise ConfigError("is required: an address, hex (0x...) or decimal", field)
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise ConfigError(f"must be an address, hex (0x...) or decimal (got {text!r:.40})", field) from None
    if not 0 <= value < 1 << 64:
        raise ConfigError(f"must be a 64-bit address (got {text!r:.40})", field)
    return value


def _flag(query: dict[str, str], name: str) -> bool:
    text = query.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise ConfigError(f"must be true or false (got {text!r:.40})", name)
    return text in ("true", "1")


def _vcpu_index(query: dict[str, str], count: int) -> int:
    text = query.get("vcpu", "0")
    if not (text.isascii() and text.isdigit()) or int(text) >= count:
        raise ConfigError(f"must be a vCPU index, 0-{count - 1} (got {text!r:.40})", "vcpu")
    return int(text)


@contextmanager
def _still(instance: "VmInstance") -> Iterator[Any]:
    """The running Vm, paused for the block (unless it already was)."""
    with instance.lock:
        vm = instance._require_vm()
        instance._refuse_during_migration("inspect its memory")
        if vm.stopped:
            raise InvalidState("the VM is stopping")
        was_paused = vm.paused
        if not was_paused:
            vm.pause()
        try:
            if vm.stopped:
                raise InvalidState("the VM is stopping")
            yield vm
        finally:
            if not was_paused:
                vm.resume()


def _mode(vcpu: Any) -> tuple[PagingMode, dict[str, int]]:
    state = vcpu.get_state()
    registers = {"cr0": state.cr0, "cr3": state.cr3, "cr4": state.cr4, "efer": state.efer}
    return PagingMode(state.cr0, state.cr3, state.cr4, state.efer), registers


def host_virtual(memory: Any, gpa: int) -> int | None:
    """Where guest-physical `gpa` is mapped in this process, or None when it is not RAM."""
    for region in getattr(memory, "regions", []):
        if region.contains(gpa):
            return region.host_address + gpa - int(region.guest_base)
    return None


def translate(instance: "VmInstance", query: dict[str, str]) -> dict[str, Any]:
    """GVA -> GPA -> HVA -> HPA for one vCPU, with every level of the walk."""
    gva = parse_address(query.get("gva"), "gva")
    with _still(instance) as vm:
        index = _vcpu_index(query, len(vm.vcpus))
        vcpu = vm.vcpus[index]
        mode, registers = _mode(vcpu)
        result = walk(vm.memory, mode, gva)
        kvm_translate = getattr(vcpu, "kvm_translate", None)
        kvm = kvm_translate(gva) if kvm_translate is not None and gva >> 64 == 0 else None
        memory = vm.memory
    answer: dict[str, Any] = {"vcpu": index, "pid": os.getpid(), **registers, **result.to_dict(),
                              "hva": None, "host": None, "kvm_translate": None}
    if result.physical is not None:
        hva = host_virtual(memory, result.physical)
        answer["hva"] = hva
        if hva is None:
            answer["fault"] = f"GPA {result.physical:#x} is not guest RAM (device memory or a hole)"
        else:
            answer["host"] = host_page(hva).to_dict()
    if kvm is not None:
        kvm["agrees"] = kvm["valid"] == result.mapped and (not kvm["valid"] or kvm["gpa"] == result.physical)
        answer["kvm_translate"] = kvm
    return answer


def read(instance: "VmInstance", query: dict[str, str]) -> bytes:
    """LENGTH bytes of guest memory at a guest-virtual (through vCPU N's page tables) or, with
    physical=true, guest-physical address."""
    address = parse_address(query.get("address"), "address")
    length_text = query.get("length", "")
    if not (length_text.isascii() and length_text.isdigit()) or not 1 <= int(length_text) <= MAX_READ:
        raise ConfigError(f"must be a number of bytes, 1-{MAX_READ} (got {length_text!r:.40})", "length")
    length, physical = int(length_text), _flag(query, "physical")
    if address + length > 1 << 64:
        raise ConfigError(f"{address:#x}+{length:#x} goes past the end of the 64-bit address space", "length")
    out = bytearray()
    with _still(instance) as vm:
        index = _vcpu_index(query, len(vm.vcpus))
        mode = None if physical else _mode(vm.vcpus[index])[0]
        while len(out) < length:
            here = address + len(out)
            if mode is None:
                gpa, room = here, length - len(out)
            else:
                step = walk(vm.memory, mode, here)
                if step.physical is None:
                    raise NotMapped(f"GVA {here:#x} is not mapped: {step.fault}")
                page = step.page_size or 1 << 32
                gpa, room = step.physical, page - here % page
            region = next((r for r in vm.memory.regions if r.contains(gpa)), None)
            if region is None:
                raise NotMapped(f"guest-physical {gpa:#x} is not guest RAM (device memory or a hole)"
                                + ("" if mode is None else f" (GVA {here:#x})"))
            chunk = min(length - len(out), room, int(region.guest_end) - gpa)
            out += vm.memory.read(gpa, chunk)
    return bytes(out)


# --- virtio-mem: GET and PUT /pyvmm/memory/virtio-mem -------------------------------------------

MiB = 1 << 20
VIRTIO_MEM_RESIZE = (Field("requested_size_mib", "integer", required=True, minimum=0,
                           description="MiB the guest should have plugged, in whole blocks"),)


def _virtio_mem(instance: "VmInstance") -> Any:
    with instance.lock:
        vm = instance._require_vm()
        device = vm.devices.get("virtio-mem")
    if device is None:
        raise InvalidState("the VM has no virtio-mem device (define it with [pyvmm] virtio_mem_mib, or "
                           "pyvmm run --virtio-mem SIZE)")
    return device


def virtio_mem_status(instance: "VmInstance") -> dict[str, Any]:
    """The region, its block size, the size asked for and the size the guest has plugged (MiB)."""
    status = _virtio_mem(instance).status()
    return {"address": status["address"], **{f"{name}_mib": status[name] // MiB for name in (
        "region_size", "block_size", "usable_region_size", "requested_size", "plugged_size")}}


def resize_virtio_mem(instance: "VmInstance", body: Any) -> None:
    """Ask the guest to plug (or unplug) blocks until `requested_size_mib` MiB are plugged."""
    size = check_body(body, VIRTIO_MEM_RESIZE)["requested_size_mib"]
    device = _virtio_mem(instance)
    limit, block = device.region_size // MiB, device.block_size // MiB
    if type(size) is not int or not 0 <= size <= limit or size % block:
        raise ConfigError(f"must be 0-{limit} MiB in whole {block} MiB blocks (got {size!r:.40})",
                          "requested_size_mib")
    device.set_requested_size(size * MiB)


# --- the OpenAPI document's part (api/openapi.py adds these) ----------------------------------

_FAULT = {"description": "bad input, an address that leads to no guest RAM, or a VM that is not running",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_INTERNAL = {"description": "internal error (a pyvmm bug)",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ADDRESS = {"type": "string", "pattern": "^(0[xX][0-9a-fA-F]{1,16}|[0-9]{1,20})$"}
_VCPU = {"name": "vcpu", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
         "description": "whose page tables (CR3) and paging mode (default 0)"}

OPENAPI_PATHS: dict[str, Any] = {
    "/pyvmm/memory/translate": {"get": {
        "operationId": "pyvmmMemoryTranslate",
        "summary": "pyvmm: a guest-virtual address through the vCPU's page walk, level by level, to the guest-physical, "
                   "host-virtual and host-physical address (the VM is paused for the walk). An address the walk cannot "
                   "map is a 200 with mapped=false and the fault saying where and why the walk stopped.",
        "parameters": [{"name": "gva", "in": "query", "required": True, "schema": _ADDRESS,
                        "description": "the guest-virtual (linear) address, hex 0x... or decimal"}, _VCPU],
        "responses": {"200": {"description": "the walk", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/PyvmmMemoryTranslation"}}}},
            "400": _FAULT, "default": _INTERNAL}}},
    "/pyvmm/memory/read": {"get": {
        "operationId": "pyvmmMemoryRead",
        "summary": "pyvmm: guest memory bytes at a guest-virtual (through the vCPU's page tables) or guest-physical "
                   "address; a range that leaves guest RAM is a 400 naming the first address that does",
        "parameters": [{"name": "address", "in": "query", "required": True, "schema": _ADDRESS,
                        "description": "where to start, hex 0x... or decimal"},
                       {"name": "length", "in": "query", "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_READ}},
                       {"name": "physical", "in": "query", "required": False, "schema": {"type": "boolean"},
                        "description": "the address is guest-physical (default: guest-virtual)"}, _VCPU],
        "responses": {"200": {"description": "the bytes", "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "400": _FAULT, "default": _INTERNAL}}},
    "/pyvmm/memory/virtio-mem": {
        "get": {"operationId": "pyvmmVirtioMem", "summary": "pyvmm: the virtio-mem device: its region, block "
                "size, the size requested and the size the guest has plugged",
                "responses": {"200": {"description": "the device", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/PyvmmVirtioMem"}}}}, "400": _FAULT, "default": _INTERNAL}},
        "put": {"operationId": "pyvmmResizeVirtioMem", "summary": "pyvmm: ask the guest to plug or unplug "
                "virtio-mem blocks until requested_size_mib are plugged (it answers at once; the guest's driver "
                "follows; GET shows plugged_size_mib)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/PyvmmVirtioMemResize"}}}},
                "responses": {"204": {"description": "asked"}, "400": _FAULT, "default": _INTERNAL}}},
}


def openapi_schemas() -> dict[str, Any]:
    integer, boolean, string = {"type": "integer"}, {"type": "boolean"}, {"type": "string"}
    maybe_int = {"type": "integer", "nullable": True}
    level = {"type": "object", "required": ["level", "table", "index", "entry_address", "entry", "flags"], "properties": {
        "level": {"type": "string", "enum": ["PML5", "PML4", "PDPT", "PD", "PT"]}, "table": integer,
        "index": integer, "entry_address": integer, "entry": {**maybe_int, "description": "null: not in guest RAM"},
        "flags": {"type": "array", "items": string}}}
    mib = {"type": "integer", "minimum": 0}
    return {"PyvmmVirtioMem": {"type": "object", "required": ["address", "region_size_mib", "block_size_mib",
                                                              "requested_size_mib", "plugged_size_mib"],
                               "properties": {"address": integer, "region_size_mib": mib, "block_size_mib": mib,
                                              "usable_region_size_mib": mib, "requested_size_mib": mib,
                                              "plugged_size_mib": mib}},
            "PyvmmVirtioMemResize": {"type": "object", "additionalProperties": False, "required": ["requested_size_mib"],
                                     "properties": {"requested_size_mib": {**mib, "description": "MiB the guest "
                                                                           "should have plugged, in whole blocks"}}},
            "PyvmmMemoryTranslation": {
        "type": "object",
        "required": ["vcpu", "gva", "mode", "levels", "mapped", "fault", "gpa", "hva", "host", "kvm_translate"],
        "properties": {
            "vcpu": integer, "pid": integer, "cr0": integer, "cr3": integer, "cr4": integer, "efer": integer,
            "gva": integer, "mode": {"type": "string", "enum": ["off", "32-bit", "PAE", "4-level", "5-level"]},
            "levels": {"type": "array", "items": level}, "mapped": boolean,
            "fault": {"type": "string", "nullable": True, "description": "where and why the walk stopped"},
            "gpa": maybe_int, "page_size": maybe_int,
            "access": {"type": "object", "nullable": True,
                       "properties": {"writable": boolean, "user": boolean, "executable": boolean}},
            "hva": {**maybe_int, "description": "the GPA in pyvmm's mapping of guest RAM (this process)"},
            "host": {"type": "object", "nullable": True, "description": "/proc/self/pagemap's record of the HVA",
                     "properties": {"hva": integer, "present": boolean, "swapped": boolean, "exclusive": boolean,
                                    "hpa": maybe_int, "note": string}},
            "kvm_translate": {"type": "object", "nullable": True, "description": "KVM_TRANSLATE's answer (KVM only)",
                              "properties": {"gpa": maybe_int, "valid": boolean, "writeable": boolean,
                                             "usermode": boolean, "agrees": boolean}}}}}
