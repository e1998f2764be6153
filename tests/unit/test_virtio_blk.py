"""virtio-blk against a fake driver and tmp_path images: framing, validation, durability, discard, locking."""

import errno
import logging
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.state import through_json
from pyvmm.persist import StateError
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers.virtio_driver import FakeDriver
from pyvmm.devices.virtio import blk
from pyvmm.devices.virtio.blk import (
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES, BlockError, VirtioBlock,
)
from pyvmm.devices.virtio.device import VIRTIO_F_VERSION_1
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

RAM = 4 << 20
SECTORS = 256
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, RAM)]) as mem:
        yield mem


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed + i // 251) & 0xFF for i in range(n))


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(SECTORS * 512, seed=3))
    return path


@pytest.fixture
def opened():
    devices = []

    def open_device(*args, **kw):
        device = VirtioBlock(*args, **kw)
        devices.append(device)
        return device
    yield open_device
    for device in devices:
        device.close()


@pytest.fixture
def disk(memory, image, opened):
    device = opened(image)
    return device, FakeDriver(memory, device, queue_size=16)


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def cut(blob: bytes, *positions: int) -> list[bytes]:
    edges = [0, *positions, len(blob)]
    return [blob[a:b] for a, b in zip(edges, edges[1:])]


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


def run(device, driver, readable, writable, queue=0, **kw):
    """Submit one request; returns (status byte, used length, bytes the device wrote before the status)."""
    q = driver.queue(queue)
    head = q.add(readable, writable, **kw)
    device.notify(queue)
    [(used_head, written)] = q.take_used()
    assert used_head == head
    out = q.written(head)
    return out[-1] if out else None, written, out[:-1]


# --- reads and writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_write_then_read_round_trip_with_odd_layouts(disk, image, indirect):
    device, driver = disk
    data = pattern(3 * 512, seed=99)
    # header split 5/11, then data cut at awkward places, the last cut sharing a buffer with nothing special
    readable = cut(header(T_OUT, 10) + data, 5, 16, 17, 700, 703)
    assert run(device, driver, readable, [1], indirect=indirect)[:2] == (S_OK, 1)
    assert image.read_bytes()[10 * 512:13 * 512] == data
    # read back: header split across two buffers, data in uneven pieces, the status byte sharing the last buffer
    status, written, out = run(device, driver, cut(header(T_IN, 10), 9), [7, 1000, 3 * 512 - 1007 + 1],
                               indirect=indirect)
    assert (status, written, out) == (S_OK, 3 * 512 + 1, data)


def test_header_and_data_in_one_buffer_and_status_alone(disk, image):
    device, driver = disk
    data = pattern(512, seed=5)
    blob = header(T_OUT, 0) + data
    assert run(device, driver, [blob[:10], blob[10:120], blob[120:]], [1])[0] == S_OK
    assert image.read_bytes()[:512] == data
    status, _, out = run(device, driver, [header(T_IN, 0)], [512, 1])
    assert status == S_OK and out == data


def test_short_transfers_and_iov_max_are_handled(disk, image, monkeypatch):
    device, driver = disk
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = []

    def short(real):
        def op(fd, views, offset):
            calls.append(len(views))
            assert len(views) <= 3
            return real(fd, [v[:100] for v in views[:1]], offset)  # at most 100 bytes per call
        return op
    monkeypatch.setattr(blk, "IOV_MAX", 3)
    monkeypatch.setattr(os, "preadv", short(real_preadv))
    monkeypatch.setattr(os, "pwritev", short(real_pwritev))
    data = pattern(1024, seed=11)
    assert run(device, driver, [header(T_OUT, 4)] + cut(data, 1, 2, 3, 4, 5, 600), [1])[0] == S_OK
    status, _, out = run(device, driver, [header(T_IN, 4)], [1, 1, 1, 1, 1, 1019, 1])
    assert status == S_OK and out == data
    assert image.read_bytes()[4 * 512:6 * 512] == data
    assert len(calls) > 20


def test_requests_are_batched_with_one_interrupt(disk):
    device, driver = disk
    q = driver.queue(0)
    heads = [q.add([header(T_IN, i)], [512, 1]) for i in range(5)]
    device.notify(0)
    assert [h for h, _ in q.take_used()] == heads
    assert driver.interrupts.used == [0]
    assert device.stats()["reads"] == 5 and device.stats()["bytes_read"] == 5 * 512


# --- flush and durability --------------------------------------------------------------------------------


def record_syncs(monkeypatch, image):
    seen = []

    def fake_fdatasync(fd):
        seen.append(Path(image).read_bytes())  # what the file held when the device asked for stability
    monkeypatch.setattr(os, "fdatasync", fake_fdatasync)
    return seen


def test_flush_syncs_after_the_writes_it_covers(disk, image, monkeypatch):
    device, driver = disk
    seen = record_syncs(monkeypatch, image)
    data = pattern(512, seed=1)
    assert run(device, driver, [header(T_OUT, 7), data], [1])[0] == S_OK
    assert seen == []  # writeback cache: no sync per write once FLUSH is negotiated
    assert run(device, driver, [header(T_FLUSH)], [1]) == (S_OK, 1, b"")
    assert len(seen) == 1 and seen[0][7 * 512:8 * 512] == data
    assert device.stats()["flushes"] == 1


def test_writes_are_synced_before_completion_without_flush(memory, image, opened, monkeypatch):
    device = opened(image)
    driver = FakeDriver(memory, device, features=VIRTIO_F_VERSION_1, queue_size=16)
    seen = record_syncs(monkeypatch, image)
    q = driver.queue(0)
    q.add([header(T_OUT, 1), pattern(512)], [1])
    q.add([header(T_OUT, 2), pattern(512)], [1])
    device.notify(0)
    assert len(q.take_used()) == 2
    assert len(seen) == 1  # one sync for the batch, before the completions


def test_config_wce_switches_to_writethrough(disk, image, monkeypatch):
    device, driver = disk
    assert device.acked_features & VIRTIO_BLK_F_CONFIG_WCE
    seen = record_syncs(monkeypatch, image)
    assert device.read_config(32, 1) == b"\x01"
    device.write_config(32, b"\x00")
    assert device.read_config(32, 1) == b"\x00"
    assert len(seen) == 1  # what was written before becomes stable on the switch
    run(device, driver, [header(T_OUT, 1), pattern(512)], [1])
    assert len(seen) == 2
    device.write_config(32, b"\x07")  # not a cache mode: ignored
    assert device.read_config(32, 1) == b"\x00"


def test_failed_sync_is_an_io_error(disk, monkeypatch):
    device, driver = disk

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    assert run(device, driver, [header(T_FLUSH)], [1])[0] == S_IOERR
    device.write_config(32, b"\x00")  # writethrough: the write's own sync fails
    assert run(device, driver, [header(T_OUT, 1), pattern(512)], [1])[0] == S_IOERR
    assert device.stats()["errors"] == 2 and not device.broken


TESTS_DIR = Path(__file__).resolve().parents[1]

DURABILITY_SCRIPT = """
import struct, sys, time
sys.path.insert(0, {tests!r})
from helpers.virtio_driver import FakeDriver
from pyvmm.devices.virtio.blk import VirtioBlock
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

memory = GuestMemory.from_specs([RegionSpec(0, 1 << 20)])  # memfd-backed guest RAM
device = VirtioBlock({image!r})
q = FakeDriver(memory, device).queue(0)
write = q.add([struct.pack("<IIQ", 1, 0, 3), bytes.fromhex({data!r})], [1])
flush = q.add([struct.pack("<IIQ", 4, 0, 0)], [1])
device.notify(0)
assert [q.written(h) for h, _ in q.take_used()] == [b"\\0", b"\\0"]
print("flushed", flush=True)
time.sleep(60)
"""


def test_flushed_data_survives_sigkill_of_the_vmm(image, tmp_path):
    data = pattern(1024, seed=42)
    script = DURABILITY_SCRIPT.format(tests=str(TESTS_DIR), image=str(image), data=data.hex())
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "flushed\n", proc.stderr.read() if proc.poll() is not None else line
        with pytest.raises(BlockError, match="locked"):  # the other process holds the image
            VirtioBlock(image)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    content = image.read_bytes()
    assert content[3 * 512:5 * 512] == data
    assert content[:3 * 512] == pattern(SECTORS * 512, seed=3)[:3 * 512]
    VirtioBlock(image).close()  # the dead VMM's lock went with it


# --- read-only, ranges, validation -----------------------------------------------------------------------


def test_readonly_disk_refuses_writes(memory, image, opened, caplog):
    before = image.read_bytes()
    device = opened(image, readonly=True)
    assert device.offered_features & VIRTIO_BLK_F_RO
    assert not device.offered_features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)
    driver = FakeDriver(memory, device, queue_size=16)
    with caplog.at_level(logging.WARNING):
        assert run(device, driver, [header(T_OUT, 0), pattern(512, 9)], [1])[0] == S_IOERR
    assert "write to a read-only disk" in caplog.text  # refused, not attempted on the read-only fd
    assert run(device, driver, [header(T_WRITE_ZEROES), segment(0, 8)], [1])[0] == S_IOERR
    assert run(device, driver, [header(T_DISCARD), segment(0, 8)], [1])[0] == S_IOERR
    assert run(device, driver, [header(T_FLUSH)], [1])[0] == S_OK
    status, _, out = run(device, driver, [header(T_IN, 0)], [512, 1])
    assert status == S_OK and out == before[:512]
    assert image.read_bytes() == before
    assert device.stats()["errors"] == 3 and device.stats()["writes"] == 0


@pytest.mark.parametrize("rtype,sector,length", [
    (T_OUT, SECTORS, 512), (T_OUT, SECTORS - 1, 1024), (T_OUT, 2**64 - 1, 512), (T_OUT, 2**55, 512),
    (T_OUT, 0, 511), (T_OUT, 0, 513),
    (T_IN, SECTORS, 512), (T_IN, SECTORS - 1, 1024), (T_IN, 2**64 - 1, 512), (T_IN, 0, 100),
])
def test_out_of_range_or_partial_sectors_are_io_errors(disk, image, rtype, sector, length):
    device, driver = disk
    before = image.read_bytes()
    if rtype == T_OUT:
        status, written, _ = run(device, driver, [header(T_OUT, sector), pattern(length, 1)], [1])
        assert written == 1
    else:
        status, written, out = run(device, driver, [header(T_IN, sector)], [length + 1])
        assert out == bytes(length)  # nothing was read into the guest's buffer
    assert status == S_IOERR
    assert image.read_bytes() == before
    assert device.stats()["errors"] == 1


def test_the_last_sector_is_reachable(disk, image):
    device, driver = disk
    data = pattern(512, 77)
    assert run(device, driver, [header(T_OUT, SECTORS - 1), data], [1])[0] == S_OK
    assert run(device, driver, [header(T_IN, SECTORS - 1)], [513])[2] == data
    assert image.read_bytes()[-512:] == data


@pytest.mark.parametrize("rtype", [2, 3, 10, 14, 0x80000000, 0xFFFFFFFF])
def test_unknown_request_types_are_unsupported(disk, rtype):
    device, driver = disk
    assert run(device, driver, [header(rtype)], [16, 1])[0] == S_UNSUPP
    assert device.stats()["errors"] == 1


def test_short_header_is_an_io_error(disk):
    device, driver = disk
    assert run(device, driver, [header(T_IN)[:15]], [513])[0] == S_IOERR
    assert run(device, driver, [], [513])[0] == S_IOERR


def test_request_without_a_status_byte_is_dropped(disk, image):
    device, driver = disk
    before = image.read_bytes()
    q = driver.queue(0)
    head = q.add([header(T_OUT, 0), pattern(512, 8)], [])
    device.notify(0)
    assert q.take_used() == [(head, 0)]
    assert image.read_bytes() == before  # not carried out: it could not be reported
    assert not device.broken
    assert run(device, driver, [header(T_IN, 0)], [513])[0] == S_OK


def test_get_id(memory, image, tmp_path, opened):
    device = opened(image, serial="disk-1")
    driver = FakeDriver(memory, device, queue_size=16)
    assert run(device, driver, [header(T_GET_ID)], [20, 1]) == (S_OK, 21, b"disk-1" + bytes(14))
    assert run(device, driver, [header(T_GET_ID)], [4, 1])[2] == b"disk"
    assert run(device, driver, [header(T_GET_ID)], [1])[0] == S_IOERR
    device.close()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(4096))
    serials = []
    for path in (image, image, other):
        device = VirtioBlock(path)
        serials.append(device.serial)
        device.close()
    assert serials[0] == serials[1] != serials[2]
    assert all(len(s) == 20 and s.isascii() for s in serials)


@pytest.mark.parametrize("serial", ["x" * 21, "d\u00e9"])
def test_bad_serial_is_refused(image, serial):
    with pytest.raises(BlockError):
        VirtioBlock(image, serial=serial)


# --- discard and write zeroes ----------------------------------------------------------------------------


def test_discard_and_write_zeroes_leave_zeroes(disk, image):
    device, driver = disk
    assert device.acked_features & VIRTIO_BLK_F_DISCARD and device.acked_features & VIRTIO_BLK_F_WRITE_ZEROES
    os.fsync(device.fd)
    blocks = os.stat(image).st_blocks
    original = image.read_bytes()
    assert run(device, driver, [header(T_DISCARD), segment(32, 64), segment(128, 8)], [1])[0] == S_OK
    assert run(device, driver, cut(header(T_WRITE_ZEROES) + segment(8, 8, 1) + segment(200, 3, 0), 20, 30), [1])[0] \
        == S_OK
    content = image.read_bytes()
    zeroed = [(32, 96), (128, 136), (8, 16), (200, 203)]
    expected = bytearray(original)
    for a, b in zeroed:
        expected[a * 512:b * 512] = bytes((b - a) * 512)
    assert content == bytes(expected)
    assert len(content) == SECTORS * 512
    if device._punch_supported:  # the tmp file system can deallocate: the discard gave blocks back
        assert os.stat(image).st_blocks < blocks
    stats = device.stats()
    assert stats["discards"] == 1 and stats["write_zeroes"] == 1 and stats["errors"] == 0


def test_write_zeroes_deallocates_only_with_unmap(disk, image):
    device, driver = disk
    os.fsync(device.fd)
    blocks = os.stat(image).st_blocks
    assert run(device, driver, [header(T_WRITE_ZEROES), segment(64, 64, 0)], [1])[0] == S_OK
    assert image.read_bytes()[64 * 512:128 * 512] == bytes(64 * 512)
    assert os.stat(image).st_blocks >= blocks  # the guest asked to keep the blocks allocated
    assert run(device, driver, [header(T_WRITE_ZEROES), segment(128, 64, 1)], [1])[0] == S_OK
    assert image.read_bytes()[128 * 512:192 * 512] == bytes(64 * 512)
    if device._punch_supported:
        assert os.stat(image).st_blocks < blocks


def test_without_hole_punching_discard_is_a_no_op_and_write_zeroes_writes(disk, image, monkeypatch):
    device, driver = disk

    def unsupported(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(blk, "fallocate", unsupported)
    original = image.read_bytes()
    assert device.read_config(56, 1) == b"\x01"
    assert run(device, driver, [header(T_DISCARD), segment(0, 4)], [1])[0] == S_OK
    assert image.read_bytes() == original  # discarded contents are undefined: leaving them is allowed
    assert device.read_config(56, 1) == b"\x00"  # write_zeroes_may_unmap withdrawn, and the driver told
    assert driver.interrupts.config == 1
    assert run(device, driver, [header(T_WRITE_ZEROES), segment(10, 4, 1)], [1])[0] == S_OK
    assert image.read_bytes()[10 * 512:14 * 512] == bytes(4 * 512)
    assert image.read_bytes()[:10 * 512] == original[:10 * 512]


@pytest.mark.parametrize("rtype,payload,expected", [
    (T_DISCARD, segment(0, 8, 1), S_UNSUPP),                 # unmap on a discard (5.2.6.2)
    (T_WRITE_ZEROES, segment(0, 8, 2), S_UNSUPP),            # unknown flag
    (T_DISCARD, segment(0, 8) + segment(8, 8, 4), S_UNSUPP),
    (T_DISCARD, b"", S_IOERR),                               # no segment
    (T_DISCARD, segment(0, 8)[:15], S_IOERR),                # not whole segments
    (T_WRITE_ZEROES, segment(0, 8) * 33, S_IOERR),           # more than max_write_zeroes_seg
    (T_DISCARD, segment(SECTORS - 4, 8), S_IOERR),           # past the end
    (T_WRITE_ZEROES, segment(0, 4) + segment(2**64 - 1, 1), S_IOERR),
    (T_DISCARD, segment(0, (1 << 30) // 512 + 1), S_IOERR),  # over max_discard_sectors
])
def test_bad_segment_lists_change_nothing(disk, image, rtype, payload, expected):
    device, driver = disk
    before = image.read_bytes()
    assert run(device, driver, [header(rtype) + payload], [1])[0] == expected
    assert image.read_bytes() == before


# --- configuration and queues ----------------------------------------------------------------------------


def test_config_layout_matches_virtio_blk_config(image, opened):
    device = opened(image, num_queues=4, queue_size=128)
    config = device.read_config(0, 60)
    assert len(device.config_bytes()) == 60
    assert struct.unpack_from("<Q", config, 0)[0] == SECTORS                       # capacity
    assert struct.unpack_from("<I", config, 12)[0] == 126                          # seg_max
    assert struct.unpack_from("<I", config, 20)[0] == 512                          # blk_size
    assert config[32] == 1                                                         # writeback
    assert struct.unpack_from("<H", config, 34)[0] == 4                            # num_queues
    assert struct.unpack_from("<III", config, 36) == (blk.MAX_DISCARD_SECTORS, blk.MAX_DISCARD_SEG,
                                                      device.discard_alignment)
    assert struct.unpack_from("<II", config, 48) == (blk.MAX_WRITE_ZEROES_SECTORS, blk.MAX_WRITE_ZEROES_SEG)
    assert config[56] == 1                                                         # write_zeroes_may_unmap
    assert device.read_config(34, 2) == b"\x04\x00"
    assert device.offered_features & VIRTIO_BLK_F_MQ and device.offered_features & VIRTIO_BLK_F_FLUSH
    assert [q.max_size for q in device.queues] == [128] * 4


def test_single_queue_does_not_offer_mq(image, opened):
    assert not opened(image).offered_features & VIRTIO_BLK_F_MQ


def test_capacity_rounds_down_with_a_warning(tmp_path, opened, caplog):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(512 * 3 + 100))
    with caplog.at_level(logging.WARNING):
        device = opened(path)
    assert device.capacity == 3
    assert "not a multiple of 512" in caplog.text


def test_second_queue_serves_requests(memory, image, opened):
    device = opened(image, num_queues=2)
    driver = FakeDriver(memory, device, queue_size=16)
    data = pattern(1024, 21)
    assert run(device, driver, [header(T_OUT, 50), data], [1], queue=1)[0] == S_OK
    assert run(device, driver, [header(T_IN, 50)], [1025], queue=1)[2] == data
    assert set(driver.interrupts.used) == {1}
    assert image.read_bytes()[50 * 512:52 * 512] == data


# --- opening the image -----------------------------------------------------------------------------------


def test_open_errors_are_one_line_block_errors(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, match in ((tmp_path / "missing.img", "no such file"), (tmp_path, "directory"),
                        (fifo, "neither a regular file")):
        with pytest.raises(BlockError, match=match) as info:
            VirtioBlock(path)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(BlockError):
        VirtioBlock(tmp_path / "missing.img", num_queues=0)


def test_unwritable_image_needs_readonly(image, opened, monkeypatch):
    immutable = False
    if os.geteuid() == 0:  # root ignores mode bits: an immutable file refuses even root
        immutable = subprocess.run(["chattr", "+i", str(image)], capture_output=True).returncode == 0
        if not immutable:
            real_open = os.open
            monkeypatch.setattr(os, "open", lambda p, flags, *a: (_ for _ in ()).throw(PermissionError(
                errno.EACCES, "Permission denied")) if flags & os.O_RDWR else real_open(p, flags, *a))
    else:
        image.chmod(0o444)
    try:
        with pytest.raises(BlockError, match="not writable") as info:
            VirtioBlock(image)
        assert "\n" not in str(info.value)
        assert opened(image, readonly=True).readonly
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(image)], check=True)


def test_image_lock_conflicts(image, opened):
    first = opened(image)
    with pytest.raises(BlockError, match="locked"):
        VirtioBlock(image)
    with pytest.raises(BlockError, match="locked"):
        VirtioBlock(image, readonly=True)
    first.close()
    readers = [opened(image, readonly=True), opened(image, readonly=True)]  # readers share
    with pytest.raises(BlockError, match="locked"):
        VirtioBlock(image)
    for reader in readers:
        reader.close()
    opened(image).close()


# --- host errors, snapshot -------------------------------------------------------------------------------


def test_host_io_errors_become_ioerr_and_are_logged_once(disk, monkeypatch, caplog):
    device, driver = disk

    def full(fd, views, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwritev", full)
    with caplog.at_level(logging.WARNING, logger="pyvmm.devices.virtio.blk"):
        for _ in range(3):
            assert run(device, driver, [header(T_OUT, 1), pattern(512)], [1])[0] == S_IOERR
    assert len([r for r in caplog.records if "No space left" in r.getMessage()]) == 1
    assert device.stats()["errors"] == 3 and not device.broken


def test_truncated_image_read_is_an_io_error(disk, image):
    device, driver = disk
    os.truncate(image, 10 * 512)
    assert run(device, driver, [header(T_IN, 20)], [513])[0] == S_IOERR
    assert run(device, driver, [header(T_IN, 2)], [513])[0] == S_OK


def test_stats_keys(disk):
    device, _ = disk
    assert set(device.stats()) == {"reads", "writes", "bytes_read", "bytes_written", "flushes", "discards",
                                   "write_zeroes", "errors", "throttled", "threaded"}


def test_save_restore(disk, image, memory):
    device, driver = disk
    run(device, driver, [header(T_OUT, 3), pattern(512)], [1])
    device.write_config(32, b"\x00")
    state = through_json(device.save())
    assert "path" not in str(state.to_dict())
    device.close()
    clone = VirtioBlock(image)
    try:
        clone.attach(memory, driver.interrupts)
        clone.restore(state)
        assert clone.save() == state
        assert clone.writeback == 0 and clone.stats()["writes"] == 1
        data = pattern(512, 13)
        status, _, _ = run(clone, driver, [header(T_OUT, 3), data], [1])
        assert status == S_OK and image.read_bytes()[3 * 512:4 * 512] == data
        assert clone.stats()["writes"] == 2
    finally:
        clone.close()
    os.truncate(image, 100 * 512)
    smaller = VirtioBlock(image)
    try:
        with pytest.raises(StateError, match="capacity: .* sectors, disk image .* has 100"):
            smaller.restore(state)
        assert smaller.save().capacity == 100 and smaller.stats()["writes"] == 0
    finally:
        smaller.close()


# --- hostile requests ------------------------------------------------------------------------------------

request_type = st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 2, 0xFFFFFFFF])
sector = st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1))
segments = st.lists(st.tuples(sector, st.integers(0, 2**32 - 1), st.integers(0, 3)), max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rtype=request_type, sector=sector, payload_len=st.integers(0, 2048), segs=segments, use_segs=st.booleans(),
       head_cuts=st.lists(st.integers(0, 40), max_size=4), writable=st.lists(st.integers(0, 1100), max_size=4),
       indirect=st.booleans())
def test_random_requests_never_raise(image, rtype, sector, payload_len, segs, use_segs, head_cuts, writable, indirect):
    size = os.path.getsize(image)
    with GuestMemory.from_specs([RegionSpec(0, RAM)]) as memory:
        device = VirtioBlock(image)
        try:
            driver = FakeDriver(memory, device, queue_size=16)
            payload = b"".join(segment(*s) for s in segs) if use_segs else pattern(payload_len)
            blob = header(rtype, sector) + payload
            readable = [p for p in cut(blob, *sorted(min(c, len(blob)) for c in head_cuts)) if p]
            q = driver.queue(0)
            head = q.add(readable, writable, indirect=indirect)
            device.notify(0)
            [(used_head, written)] = q.take_used()
            assert used_head == head and not device.broken
            if sum(writable):
                assert written == sum(writable) and q.written(head)[-1] in (S_OK, S_IOERR, S_UNSUPP)
            else:
                assert written == 0
        finally:
            device.close()
    assert os.path.getsize(image) == size
