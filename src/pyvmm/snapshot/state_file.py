"""The state file: a VmState in a versioned, checksummed container.

    offset  size  field
    0       8     magic b"PYVMMSTA"
    8       4     format version (little-endian u32; this pyvmm writes and reads FORMAT_VERSION)
    12      4     reserved, zero
    16      8     payload length in bytes (u64)
    24      32    SHA-256 of the payload
    56      ...   payload: UTF-8 JSON {"vm": VmState.to_dict(), "memory_regions": [[base, size], ...],
                  "vm_config": the API's configuration document or null}

The container catches what a file can suffer (cut short, bit rot, another program's file, a
newer pyvmm's format); persist's from_dict then checks every field of the state. The RAM
layout the memory file was written in (guest-physical base and size of each region, in
order) is recorded beside the state, so a pyvmm whose layout for that RAM size differs
refuses the file instead of loading pages at the wrong addresses. A VM saved through the API
records its configuration document (Firecracker's layout) too, so the VM loaded from the file
can answer GET /vm/config and knows its interfaces' ids. Migration can send the same bytes
over its stream. Every problem is one `StateError` line naming the source.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

from ..arch.x86_64 import layout
from ..persist import StateError
from ..vm_state import VmState

MAGIC = b"PYVMMSTA"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sII Q 32s")
HEADER_SIZE = _HEADER.size
MAX_PAYLOAD = 256 << 20     # far above any real state: a length beyond it is a corrupted header


def memory_regions(state: VmState) -> list[tuple[int, int]]:
    """(guest_base, size) of each RAM region of the state's machine, in guest-physical order:
    the layout its memory file is written in."""
    return [(spec.guest_base, spec.size) for spec in layout.memory_specs(state.machine.memory,
                                                                           state.machine.virtio_mem_size)]


def encode_state(state: VmState, *, vm_config: dict[str, Any] | None = None) -> bytes:
    """The state file's bytes for `state` (and the VM's configuration document, if any)."""
    payload = json.dumps({"vm": state.to_dict(), "memory_regions": memory_regions(state), "vm_config": vm_config},
                         separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), hashlib.sha256(payload).digest()) + payload


def decode_state(data: bytes | bytearray | memoryview, source: str) -> VmState:
    """The VmState in `data` (a state file's bytes, read from `source`: a path or a stream's
    name, used in the message). StateError, one line, for anything wrong with it."""
    return decode_snapshot(data, source)[0]


def decode_snapshot(data: bytes | bytearray | memoryview, source: str) -> tuple[VmState, dict[str, Any] | None]:
    """decode_state, and the configuration document recorded with the state (or None)."""
    data = memoryview(data)
    if len(data) < HEADER_SIZE:
        if bytes(data[:len(MAGIC)]) != MAGIC[:len(data)]:
            raise StateError(f"{source}: not a pyvmm state file (bad magic)")
        raise StateError(f"{source}: truncated: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    magic, version, reserved, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError(f"{source}: not a pyvmm state file (bad magic)")
    if version != FORMAT_VERSION:
        raise StateError(f"{source}: state file format version {version} is not supported "
                         f"(this pyvmm reads version {FORMAT_VERSION})")
    if reserved != 0 or length > MAX_PAYLOAD:
        raise StateError(f"{source}: corrupted header")
    payload = data[HEADER_SIZE:]
    if len(payload) < length:
        raise StateError(f"{source}: truncated: {HEADER_SIZE + len(payload)} of {HEADER_SIZE + length} bytes")
    if len(payload) > length:
        raise StateError(f"{source}: {len(payload) - length} bytes after the end of the state")
    if hashlib.sha256(payload).digest() != digest:
        raise StateError(f"{source}: bad checksum: the state file is corrupted")
    try:
        document = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"{source}: the state is not valid JSON ({exc})") from None
    if not isinstance(document, dict) or set(document) != {"vm", "memory_regions", "vm_config"}:
        raise StateError(f"{source}: the state must hold vm, memory_regions and vm_config")
    vm_config = document["vm_config"]
    if vm_config is not None and not isinstance(vm_config, dict):
        raise StateError(f"{source}: vm_config must be an object or null")
    try:
        state = VmState.from_dict(document["vm"])
    except StateError as exc:
        raise StateError(f"{source}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        # from_dict checks types; anything it did not foresee is still a bad field, never a traceback
        raise StateError(f"{source}: vm state: {type(exc).__name__}: {exc}") from None
    regions = document["memory_regions"]
    if regions != [list(region) for region in memory_regions(state)]:
        raise StateError(f"{source}: memory_regions: the file's RAM layout {_describe(regions)} is not this "
                         f"pyvmm's for {state.machine.memory >> 20} MiB")
    return state, vm_config


def _describe(regions: object) -> str:
    if isinstance(regions, list) and all(isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)
                                         for r in regions):
        return ", ".join(f"{base:#x}+{size:#x}" for base, size in regions)
    return f"{str(regions):.80}"


def read_state_file(path: str) -> VmState:
    """The VmState in the state file at `path` (StateError, one line, if it cannot be read)."""
    return read_snapshot(path)[0]


def read_snapshot(path: str) -> tuple[VmState, dict[str, Any] | None]:
    """The VmState in the state file at `path` and the configuration document saved with it."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PAYLOAD + HEADER_SIZE + 1)
    except OSError as exc:
        raise StateError(f"{path}: {exc.strerror}") from None
    return decode_snapshot(data, path)


def write_state_file(path: str, state: VmState, *, vm_config: dict[str, Any] | None = None) -> None:
    """Write `state` to `path`: a temporary file renamed over it once complete, so a reader never
    sees half a file and a failed write leaves what was there."""
    data = encode_state(state, vm_config=vm_config)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateError(f"{path}: cannot write the state file: {exc.strerror}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise StateError(f"{path}: cannot write the state file: {exc.strerror}") from None
