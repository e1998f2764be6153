"""The state file codec: a VmState round-trips through encode_state/decode_state, and every way
a file can be wrong (cut short, another program's file, bit rot, a newer format, a bad field, a
RAM layout this pyvmm does not use) is one StateError line naming the source."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.persist import StateError
from pyvmm.snapshot.state_file import (HEADER_SIZE, decode_state, encode_state, read_snapshot, read_state_file,
                                       write_state_file)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    kernel = tmp_path_factory.mktemp("k") / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")  # cli; hlt
    config = MachineConfig(kernel=str(kernel), flat_address=0x100000, memory=16 << 20, rng="mmio")
    vm = build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create())
    try:
        vm.pause()
        return vm.save()
    finally:
        vm.close()


def _rebuilt(payload: dict) -> bytes:
    """A well-formed container around `payload` (its checksum right), as a buggy writer could make."""
    data = json.dumps(payload).encode()
    return struct.pack("<8sIIQ32s", b"PYVMMSTA", 1, 0, len(data), hashlib.sha256(data).digest()) + data


def _one_line(data: bytes, pattern: str) -> None:
    with pytest.raises(StateError, match=pattern) as error:
        decode_state(data, "snap.state")
    assert "\n" not in str(error.value)


def test_a_state_round_trips(state):
    data = encode_state(state)
    assert data[:8] == b"PYVMMSTA"
    assert decode_state(data, "x") == state
    assert decode_state(memoryview(data), "x") == state


def test_write_and_read_a_state_file(state, tmp_path):
    path = str(tmp_path / "vm.state")
    write_state_file(path, state)
    assert read_state_file(path) == state
    assert read_snapshot(path) == (state, None)
    document = {"machine-config": {"vcpu_count": 1, "mem_size_mib": 16}}
    write_state_file(path, state, vm_config=document)
    assert read_snapshot(path) == (state, document)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.state"]   # no temporary left behind


def test_every_truncation_is_one_line(state):
    data = encode_state(state)
    for cut in (0, 3, 8, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, len(data) // 2, len(data) - 1):
        _one_line(data[:cut], r"^snap\.state: truncated: ")


def test_bad_magic(state):
    data = encode_state(state)
    _one_line(b"QFI\xfb" + data[4:], r"^snap\.state: not a pyvmm state file \(bad magic\)$")
    _one_line(b"\x7fELF", r"^snap\.state: not a pyvmm state file \(bad magic\)$")


def test_every_flipped_payload_byte_is_a_bad_checksum(state):
    data = bytearray(encode_state(state))
    for offset in (HEADER_SIZE, HEADER_SIZE + 100, len(data) // 2, len(data) - 1):
        corrupted = bytearray(data)
        corrupted[offset] ^= 0x20
        _one_line(bytes(corrupted), r"^snap\.state: bad checksum: the state file is corrupted$")
    corrupted = bytearray(data)
    corrupted[30] ^= 1   # in the recorded digest
    _one_line(bytes(corrupted), r"^snap\.state: bad checksum")


def test_wrong_format_version(state):
    data = bytearray(encode_state(state))
    struct.pack_into("<I", data, 8, 2)
    _one_line(bytes(data), r"^snap\.state: state file format version 2 is not supported \(this pyvmm reads version 1\)$")


def test_a_corrupted_header(state):
    data = bytearray(encode_state(state))
    struct.pack_into("<Q", data, 16, 1 << 60)
    _one_line(bytes(data), r"^snap\.state: corrupted header$")
    _one_line(encode_state(state) + b"x", r"^snap\.state: 1 bytes after the end of the state$")


def test_bad_fields_are_named(state):
    good = json.loads(encode_state(state)[HEADER_SIZE:])
    vm = good["vm"]
    wrong_cpus = json.loads(json.dumps(good))
    wrong_cpus["vm"]["fields"]["machine"]["fields"]["cpus"] = 2
    _one_line(_rebuilt(wrong_cpus), r"^snap\.state: vm state: vcpus: 1 saved, the machine has 2$")
    wrong_type = json.loads(json.dumps(good))
    wrong_type["vm"]["fields"]["guest_clock_ns"] = "soon"
    _one_line(_rebuilt(wrong_type), r"^snap\.state: vm\.guest_clock_ns: expected int, got str")
    newer = json.loads(json.dumps(good))
    newer["vm"]["version"] = 99
    _one_line(_rebuilt(newer), r"^snap\.state: vm state: version 99 is not supported")
    _one_line(_rebuilt({"vm": vm}), r"^snap\.state: the state must hold vm, memory_regions and vm_config$")
    _one_line(_rebuilt([1, 2]), r"^snap\.state: the state must hold vm, memory_regions and vm_config$")
    _one_line(_rebuilt({**good, "vm_config": [1]}), r"^snap\.state: vm_config must be an object or null$")
    not_json = b"{" * 10
    _one_line(struct.pack("<8sIIQ32s", b"PYVMMSTA", 1, 0, len(not_json), hashlib.sha256(not_json).digest()) + not_json,
              r"^snap\.state: the state is not valid JSON")


def test_a_ram_layout_this_pyvmm_does_not_use_is_refused(state):
    good = json.loads(encode_state(state)[HEADER_SIZE:])
    good["memory_regions"] = [[0, 8 << 20], [1 << 32, 8 << 20]]
    _one_line(_rebuilt(good), r"^snap\.state: memory_regions: the file's RAM layout 0x0\+0x800000, "
                              r"0x100000000\+0x800000 is not this pyvmm's for 16 MiB$")
    good["memory_regions"] = "everything"
    _one_line(_rebuilt(good), r"^snap\.state: memory_regions: the file's RAM layout everything is not")


def test_unreadable_file_is_one_line(state, tmp_path):
    with pytest.raises(StateError, match=r"^/nonexistent/x\.state: No such file or directory$"):
        read_state_file("/nonexistent/x.state")
    with pytest.raises(StateError, match=r"cannot write the state file: No such file or directory$"):
        write_state_file(str(tmp_path / "missing" / "x.state"), state)


def test_a_fresh_process_knows_every_state_kind():
    """A state file is read in a process that built no VM (pyvmm restore, an API load): every
    State kind defined in pyvmm must be registered by importing the codec alone."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    import pyvmm

    defined = {match.group(1) for path in Path(pyvmm.__file__).parent.rglob("*.py")
               for match in re.finditer(r'^    KIND = "([^"]+)"', path.read_text(), re.M)}
    code = "import pyvmm.snapshot.state_file; from pyvmm.persist import _KINDS; print(' '.join(_KINDS))"
    known = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert len(defined) > 20 and defined <= known, sorted(defined - known)
