"""Dirty-page tracking with the default Linux guest on the software CPU: while the log runs,
virtio-blk reads land in guest RAM (the device thread's preadv into the guest's page cache),
and every page they land in is in the log."""

from __future__ import annotations

import hashlib
import os

from pyvmm.config import DiskConfig, MachineConfig

PATTERN_OFFSET = 2 << 20     # far from what the kernel's partition scan reads at boot
PATTERN_BLOCKS = 256         # 1 MiB of random 4 KiB blocks, unlike anything already in RAM
BLOCK = 4096
GO = b"go-read-the-pattern\n"

# Wait until the host writes GO into sector 0 (caches dropped before every look, so each is
# a device read), then read the pattern region into the page cache.
WORKLOAD = r"""
echo guest-waiting
while [ "$(echo 1 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 19)" != "go-read-the-pattern" ]; do
  sleep 0.1
done
dd if=/dev/vda bs=1M skip=2 count=1 of=/dev/null 2>/dev/null
echo pattern-read
sleep 600
"""


def test_a_virtio_blk_read_lands_in_pages_the_log_reports(pyvmm, tmp_path):
    disk = tmp_path / "disk.img"
    pattern = [os.urandom(BLOCK) for _ in range(PATTERN_BLOCKS)]
    with open(disk, "wb") as image:
        image.truncate(4 << 20)
        image.seek(PATTERN_OFFSET)
        image.write(b"".join(pattern))
    guest = pyvmm.in_process(MachineConfig(disks=(DiskConfig(str(disk)),)), ["sh", "-c", WORKLOAD], accel="tcg")
    vm = guest.vm
    try:
        vm.start()
        guest.wait_for(b"guest-waiting")
        vm.start_dirty_log()
        vm.dirty_log()  # what the boot wrote so far is not this test's
        with open(disk, "r+b") as image:
            image.write(GO)
        guest.wait_for(b"pattern-read")
        vm.pause()
        dirty = vm.dirty_log()
        where = _pages_holding(vm.memory, {hashlib.sha256(block).digest(): i for i, block in enumerate(pattern)})
    finally:
        guest.kill()
    guest.check_kernel_warnings()
    # The guest's page cache keeps most of what dd read (a few pages are gone again by the
    # time the VM is paused, different ones each run): enough to check, every one of them.
    assert len(where) >= PATTERN_BLOCKS * 3 // 4, f"only {len(where)} pattern blocks are in guest RAM"
    missed = [hex(page) for pages in where.values() for page in pages if page not in dirty]
    assert missed == [], f"pages the device wrote but the log does not report: {missed}"
    total = vm.memory.size // BLOCK
    assert dirty.count() < total // 4, f"{dirty.count()} of {total} pages dirty: the log reports far more than was written"


def _pages_holding(memory, digests: dict[bytes, int]) -> dict[int, list[int]]:
    """Block index -> the guest pages whose whole content is that block."""
    found: dict[int, list[int]] = {}
    for region in memory.regions:
        base = int(region.guest_base)
        for offset in range(0, region.size, BLOCK):
            index = digests.get(hashlib.sha256(region.view[offset:offset + BLOCK]).digest())
            if index is not None:
                found.setdefault(index, []).append(base + offset)
    return found
