"""The default Linux guest's large disk requests, moved on the VM's transfer threads
(host/disk_transfers.py): 1 MiB direct reads return the image's bytes, 1 MiB direct writes
reach it, several in flight at once (dd's requests and the page cache's readahead), and the
device's counters show the threads moved them. Without the compiled group the same guest
script runs, every request served where it was kicked."""

from __future__ import annotations

import hashlib
import random

from pyvmm.host import disk_transfers
from pyvmm.config import DiskConfig, MachineConfig

MIB = 1 << 20

# 8 MiB read in 1 MiB direct requests, 4 MiB written the same way after it (seq's output: the
# host can make the same bytes), then the whole disk read back through the page cache.
SCRIPT = r"""
echo "READ $(dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
seq 1 2000000 | head -c 4194304 | dd of=/dev/vda bs=1M seek=8 oflag=direct iflag=fullblock 2>/dev/null
echo "WROTE $?"
echo "ALL $(dd if=/dev/vda bs=1M 2>/dev/null | md5sum | cut -d' ' -f1)"
"""


def _written_by_seq() -> bytes:
    return "".join(f"{n}\n" for n in range(1, 2000001)).encode()[:4 * MIB]


def test_large_requests_move_on_the_transfer_threads(pyvmm, tmp_path):
    disk = tmp_path / "disk.img"
    content = random.Random(23).randbytes(8 * MIB)
    disk.write_bytes(content + bytes(8 * MIB))
    guest = pyvmm.in_process(MachineConfig(disks=(DiskConfig(str(disk)),)), ["sh", "-c", SCRIPT], accel="tcg")
    outcome, console, stats = guest.run_to_end(lambda vm: vm.device_manager.device("virtio-blk0").stats())
    assert outcome is not None and (outcome.reason, outcome.status) == ("poweroff", 0), (outcome, console[-2000:])
    assert f"READ {hashlib.md5(content).hexdigest()}" in console, console[-2000:]
    assert "WROTE 0" in console, console[-2000:]
    image = disk.read_bytes()
    assert image[:8 * MIB] == content and image[8 * MIB:12 * MIB] == _written_by_seq()
    assert f"ALL {hashlib.md5(image).hexdigest()}" in console, console[-2000:]
    if disk_transfers.available():
        assert stats["threaded"] >= 12, stats   # the 8 reads and 4 writes at least
    else:
        assert stats["threaded"] == 0, stats
