"""vhost-user-blk against a real back-end: qemu-storage-daemon serving a raw image file.

The fake driver builds requests in memfd-backed guest RAM; the daemon maps that RAM, serves
the rings and signals completions through the call eventfd. Needs /usr/bin/qemu-storage-daemon
(Debian package qemu-system-common): required on CI (CI=true), skipped elsewhere when absent.
"""

import os
import shutil
import struct
import subprocess
import time

import pytest

from helpers.state import through_json
from helpers.virtio_driver import BumpAllocator, FakeDriver
from pyvmm.devices.virtio.device import VIRTIO_F_INDIRECT_DESC
from pyvmm.devices.virtio.vhost_user_blk import (
    CONFIG_SIZE, CONFIG_WCE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VhostUserBlk,
)
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.vhost_user import VhostUserError
from pyvmm.vhost_user.protocol import VHOST_USER_F_PROTOCOL_FEATURES

SECTOR = 512
IMAGE_SIZE = 8 << 20
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_UNSUPP = 0, 2


def storage_daemon() -> str:
    path = shutil.which("qemu-storage-daemon")
    if path is None:
        message = "qemu-storage-daemon is not installed (Debian package qemu-system-common)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must install it (scripts/setup)")
        pytest.skip(message)
    return path


class Daemon:
    def __init__(self, tmp_path, *, num_queues=1, writable=True):
        self.image = tmp_path / "disk.img"
        self.socket = tmp_path / "vhost-user-blk.sock"
        pidfile = tmp_path / "qsd.pid"
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
            f.seek(7 * SECTOR)
            f.write(b"sector 7 was here".ljust(SECTOR, b"."))
        self.log = open(tmp_path / "qsd.log", "w+")
        self.proc = subprocess.Popen(
            [storage_daemon(), "--blockdev", f"driver=file,node-name=disk0,filename={self.image}",
             "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={self.socket},"
                         f"writable={'on' if writable else 'off'},num-queues={num_queues}",
             "--pidfile", str(pidfile)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and self.socket.exists()):  # the pid file is written once exports are up
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                self.log.seek(0)
                pytest.fail(f"qemu-storage-daemon did not start: {self.log.read().strip()}")
            time.sleep(0.02)

    def read_image(self, offset, size):
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, 2 << 20), RegionSpec(4 << 20, 2 << 20)]) as mem:
        yield mem


@pytest.fixture
def device(daemon, iothread):
    dev = VhostUserBlk(daemon.socket, iothread=iothread, queue_size=64)
    yield dev
    dev.close()


def header(kind, sector=0):
    return struct.pack("<IIQ", kind, 0, sector)


def wait_used(queue, count, timeout=10.0):
    """Wait until the back-end has completed `count` more requests; returns their (head, written)."""
    deadline = time.monotonic() + timeout
    done = []
    while len(done) < count:
        done += queue.take_used()
        if time.monotonic() > deadline:
            raise AssertionError(f"the back-end completed {len(done)} of {count} requests in {timeout} s")
        time.sleep(0.002)
    return done


def do_request(device, queue, readable, writable, index=0, **kw):
    head = queue.add(readable, writable, **kw)
    device.notify(index)
    [(done_head, written)] = wait_used(queue, 1)
    assert done_head == head
    return queue.written(head), written


def write_sector(device, queue, sector, data, index=0):
    out, _ = do_request(device, queue, [header(T_OUT, sector), data], [1], index)
    return out[-1]


def read_sectors(device, queue, sector, count=1, index=0, **kw):
    data, written = do_request(device, queue, [header(T_IN, sector)], [count * SECTOR, 1], index, **kw)
    assert written == count * SECTOR + 1
    return data[:-1], data[-1]


def test_features_and_config_come_from_the_daemon(device):
    assert device.offered_features & VIRTIO_BLK_F_FLUSH and device.offered_features & VIRTIO_BLK_F_CONFIG_WCE
    assert not device.offered_features & VIRTIO_BLK_F_RO
    assert not device.offered_features & VHOST_USER_F_PROTOCOL_FEATURES
    assert device.frontend.backend_features & VHOST_USER_F_PROTOCOL_FEATURES  # the daemon has it
    capacity, = struct.unpack_from("<Q", device.config_bytes())
    assert capacity == IMAGE_SIZE // SECTOR


def test_write_then_read_back_through_the_daemon(device, daemon, memory):
    driver = FakeDriver(memory, device)
    queue = driver.queue(0)
    payload = bytes(range(256)) * 2
    assert write_sector(device, queue, 3, payload) == S_OK
    assert daemon.read_image(3 * SECTOR, SECTOR) == payload  # on disk (no cache in between: O_DIRECT not needed)
    data, status = read_sectors(device, queue, 3)
    assert (data, status) == (payload, S_OK)
    data, status = read_sectors(device, queue, 7)
    assert data.startswith(b"sector 7 was here") and status == S_OK
    assert 0 in driver.interrupts.used  # completions came back through the call eventfd


def test_flush_and_get_id(device, memory):
    driver = FakeDriver(memory, device)
    queue = driver.queue(0)
    out, _ = do_request(device, queue, [header(T_FLUSH)], [1])
    assert out[-1] == S_OK
    out, _ = do_request(device, queue, [header(T_GET_ID)], [20, 1])
    assert out[:20].rstrip(b"\0") == b"vhost_user_blk" and out[-1] == S_OK
    out, _ = do_request(device, queue, [header(99)], [1])
    assert out[-1] == S_UNSUPP


def test_many_requests_indirect_and_in_the_second_region(device, daemon, memory):
    driver = FakeDriver(memory, device)
    assert device.acked_features & VIRTIO_F_INDIRECT_DESC
    queue = driver.queue(0)
    queue.allocator = BumpAllocator(4 << 20, 6 << 20)  # buffers and indirect tables in the second region
    heads = [queue.add([header(T_OUT, 100 + i), bytes([i]) * SECTOR], [1], indirect=bool(i % 2)) for i in range(20)]
    device.notify(0)
    done = wait_used(queue, 20)  # 40 descriptors: the fake driver never recycles them
    assert sorted(head for head, _ in done) == sorted(heads)
    assert all(queue.written(head) == bytes([S_OK]) for head in heads)
    for i in range(20):
        assert daemon.read_image((100 + i) * SECTOR, SECTOR) == bytes([i]) * SECTOR
    data, _ = read_sectors(device, queue, 100, count=4, indirect=True)
    assert data == b"".join(bytes([i]) * SECTOR for i in range(4))


def test_buffers_queued_before_driver_ok_are_served(device, memory):
    driver = FakeDriver(memory, device, activate=False)
    queue = driver.queue(0)
    head = queue.add([header(T_IN, 7)], [SECTOR, 1])
    device.activate()
    [(done, _)] = wait_used(queue, 1)
    assert done == head and queue.written(head).startswith(b"sector 7")


def test_reset_stops_the_rings_and_the_device_starts_again(device, daemon, memory):
    driver = FakeDriver(memory, device)
    assert write_sector(device, driver.queue(0), 1, b"1" * SECTOR) == S_OK
    device.reset()
    assert not device.active and device.frontend.dead is None
    memory.fill(0, 2 << 20)  # a new driver, fresh rings where the old ones were
    driver = FakeDriver(memory, device)
    assert device.active and not device.broken
    assert read_sectors(device, driver.queue(0), 1) == (b"1" * SECTOR, S_OK)


def test_writeback_cache_setting_reaches_the_daemon(device, memory):
    FakeDriver(memory, device)
    device.write_config(CONFIG_WCE, b"\x01")
    assert device.read_config(CONFIG_WCE, 1) == b"\x01"
    # The daemon's own view (it ignores GET_CONFIG's offset: always ask from 0).
    assert device.frontend.get_config(0, CONFIG_SIZE)[CONFIG_WCE] == 1


def test_device_writes_are_reported_for_the_software_cpu(device, memory):
    writes = []
    memory.on_device_writes = writes.extend
    driver = FakeDriver(memory, device)
    queue = driver.queue(0)
    head = queue.add([header(T_IN, 7)], [SECTOR, 1])
    device.notify(0)
    wait_used(queue, 1)
    assert wait_until(lambda: len(writes) >= 2)
    data_buffer, status_buffer = driver.queue(0).writable[head]
    assert writes[:2] == [(data_buffer[0], SECTOR), (status_buffer[0], 1)]


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_two_queues(tmp_path, iothread, memory):
    daemon = Daemon(tmp_path, num_queues=2)
    try:
        device = VhostUserBlk(daemon.socket, iothread=iothread, num_queues=2, queue_size=32)
        try:
            assert device.offered_features & VIRTIO_BLK_F_MQ
            driver = FakeDriver(memory, device)
            assert write_sector(device, driver.queue(1), 9, b"q" * SECTOR, index=1) == S_OK
            assert read_sectors(device, driver.queue(0), 9) == (b"q" * SECTOR, S_OK)
            assert 1 in driver.interrupts.used
        finally:
            device.close()
        with pytest.raises(VhostUserError, match="serves 2 queue"):
            VhostUserBlk(daemon.socket, iothread=iothread, num_queues=3)
    finally:
        daemon.stop()


def test_read_only_export(tmp_path, iothread):
    daemon = Daemon(tmp_path, writable=False)
    try:
        device = VhostUserBlk(daemon.socket, iothread=iothread)
        assert device.offered_features & VIRTIO_BLK_F_RO
        device.close()
    finally:
        daemon.stop()


def test_daemon_killed_marks_the_device_needs_reset(device, daemon, memory):
    driver = FakeDriver(memory, device)
    assert write_sector(device, driver.queue(0), 2, b"x" * SECTOR) == S_OK
    daemon.proc.kill()
    assert wait_until(lambda: driver.interrupts.needs_reset)
    assert device.broken == "vhost-user back-end closed the connection"
    device.reset()
    device.activate()
    assert not device.active


def test_missing_daemon_is_a_one_line_error(tmp_path, iothread):
    with pytest.raises(VhostUserError, match="does not exist") as error:
        VhostUserBlk(tmp_path / "absent.sock", iothread=iothread)
    assert "\n" not in str(error.value)


def test_save_reads_the_back_ends_ring_positions_and_a_new_front_end_continues(device, daemon, memory, iothread):
    driver = FakeDriver(memory, device)
    queue = driver.queue(0)
    payload = b"before the save." * 32
    assert write_sector(device, queue, 5, payload) == S_OK
    state = through_json(device.save())                   # GET_VRING_BASE, then the rings start again
    assert state.virtio.queues[0].last_avail == 1 and state.virtio.queues[0].used_idx == 1
    assert read_sectors(device, queue, 5) == (payload, S_OK)   # the device still serves after the save
    state = through_json(device.save())
    assert state.virtio.queues[0].last_avail == 2
    device.close()

    fresh = VhostUserBlk(daemon.socket, iothread=iothread, queue_size=64)
    try:
        fresh.attach(memory, driver.interrupts)
        fresh.restore(state)                               # SET_VRING_BASE from the saved position
        assert fresh.active
        after = b"after a restore." * 32
        assert write_sector(fresh, queue, 6, after) == S_OK
        assert read_sectors(fresh, queue, 6) == (after, S_OK)
        assert daemon.read_image(5 * SECTOR, SECTOR) == payload
        assert fresh.save().virtio.queues[0].last_avail == 4
    finally:
        fresh.close()
