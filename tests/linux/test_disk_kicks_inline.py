"""The default Linux guest's disk requests on the software CPU, served in the slice that kicked
them (inline_kicks.py): O_DIRECT reads return the image's bytes, writes reach the image, and
the vCPU's counters show the kicks were served there rather than all on the I/O thread."""

from __future__ import annotations

import hashlib
import random

from pyvmm import inline_kicks
from pyvmm.config import DiskConfig, MachineConfig

MIB = 1 << 20
WRITE_AT = 4 * MIB

# Read 4 MiB in 4 KiB direct requests (one kick each, queue depth 1); write 1 MiB the same way
# after it (seq's output: the host can make the same bytes).
SCRIPT = r"""
echo "READ $(dd if=/dev/vda bs=4k count=1024 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
seq 1 200000 | head -c 1048576 | dd of=/dev/vda bs=4k seek=1024 oflag=direct 2>/dev/null
echo "WROTE $?"
"""


def _written_by_seq() -> bytes:
    return "".join(f"{n}\n" for n in range(1, 200001)).encode()[:MIB]


def test_direct_requests_served_in_the_guests_slice_read_and_write_the_image(pyvmm, tmp_path, monkeypatch):
    # Kicks slower than SLOW_NS in a row (the host busy at the wrong moments: wall time) send a
    # second of kicks to the I/O thread, longer than this whole test's I/O (a CI run once saw
    # 144 of 1280 served in place, when one slow kick did it). The backoff has its own unit
    # tests; here it is off.
    monkeypatch.setattr(inline_kicks, "SLOW_NS", 1 << 62)
    disk = tmp_path / "disk.img"
    content = random.Random(17).randbytes(4 * MIB)
    disk.write_bytes(content + bytes(4 * MIB))
    guest = pyvmm.in_process(MachineConfig(disks=(DiskConfig(str(disk)),)), ["sh", "-c", SCRIPT], accel="tcg")
    outcome, console, (counts, requests) = guest.run_to_end(lambda vm: (
        vm.exit_counts(), vm.device_manager.device("virtio-blk0").queue_counters()["requests"]))
    assert outcome is not None and (outcome.reason, outcome.status) == ("poweroff", 0), (outcome, console[-2000:])
    assert f"READ {hashlib.md5(content).hexdigest()}" in console, console[-2000:]
    assert "WROTE 0" in console, console[-2000:]
    image = disk.read_bytes()
    assert image[WRITE_AT:WRITE_AT + MIB] == _written_by_seq()
    assert image[:4 * MIB] == content
    # 1024 + 256 direct requests, most served where they were kicked (a few, made while the I/O
    # thread held the device, on it); a guest that never reached the path would show none
    assert requests >= 1280
    assert counts.get("kicks_served", 0) >= 640, counts
    # each request the guest's only one and waited for: most kicks end their slice (all but
    # every 16th, once the first has been seen), so the interrupt comes before the guest idles
    assert counts.get("slices_ended_by_kicks", 0) >= 320, counts
