"""Large disk requests moved on transfer threads: the device's side against a fake that moves
data only when told, then the C threads (transfer_threads.c) and the VM's DiskTransfers."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading

import pytest

from helpers.state import through_json
from helpers.virtio_driver import FakeDriver
from pyvmm.compiled import c_module
from pyvmm.devices.virtio.blk import LARGE_TRANSFER, VirtioBlock
from pyvmm.devices.virtio.queue import buffer_views
from pyvmm.host import disk_transfers
from pyvmm.iothread import IoThread
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

RAM = 8 << 20
IMAGE = 2 << 20
T_IN, T_OUT = 0, 1
S_OK, S_IOERR = 0, 1
LARGE = LARGE_TRANSFER


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 13 + seed + i // 509) & 0xFF for i in range(n))


def header(rtype: int, sector: int) -> bytes:
    return rtype.to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little")


class FakeTransfers:
    """host_side.DiskTransfers that moves data only when told (as threads that have not run yet)."""

    def __init__(self) -> None:
        self.started: list[dict] = []
        self.idle_waits = 0

    def start(self, finished, item, writing, fd, offset, memory, pieces, skip, length) -> None:
        self.started.append(dict(finished=finished, item=item, writing=writing, fd=fd, offset=offset,
                                 buffers=buffer_views(memory, pieces, skip, length), moved=False))

    def move(self) -> None:
        for job in self.started:
            if not job["moved"]:
                op = os.pwritev if job["writing"] else os.preadv
                assert op(job["fd"], job["buffers"], job["offset"]) == sum(len(b) for b in job["buffers"])
                job["moved"] = True

    def wait_idle(self) -> None:
        self.idle_waits += 1
        self.move()

    def end(self, error: int = 0) -> None:
        """Every started transfer ends now, handed back in one call per device."""
        if not error:
            self.move()
        jobs, self.started = self.started, []
        disk_transfers.hand_out([(job["finished"], job["item"], error) for job in jobs])


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, RAM)]) as mem:
        yield mem


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(IMAGE, seed=5))
    return path


@pytest.fixture
def threads():
    return FakeTransfers()


@pytest.fixture
def disk(memory, image, threads):
    device = VirtioBlock(image, transfers=threads)
    yield device, FakeDriver(memory, device, queue_size=64)
    device.close()
    threads.started.clear()  # (the views of guest RAM they hold: as the VM's close() does)


def add_read(driver, sector: int, length: int, pieces: int = 3) -> int:
    cut = [length // pieces] * (pieces - 1)
    return driver.queue(0).add([header(T_IN, sector)], [*cut, length - sum(cut), 1])


def add_write(driver, sector: int, data: bytes) -> int:
    return driver.queue(0).add([header(T_OUT, sector), data[:1000], data[1000:]], [1])


def test_large_reads_move_on_the_threads_and_complete_together_with_one_interrupt(disk, threads, image):
    device, driver = disk
    q = driver.queue(0)
    large = [add_read(driver, sector, LARGE) for sector in (0, 512, 1024)]
    small = add_read(driver, 7, 4096, pieces=1)
    device.notify(0)
    assert q.take_used() == [(small, 4097)]          # served in place, at once
    assert driver.interrupts.used == [0]
    assert len(threads.started) == 3 and q.written(large[0]) == bytes(LARGE + 1)  # nothing moved yet
    q.set_used_event(q.used_idx())                   # (the driver wants the next interrupt)
    threads.end()
    assert q.take_used() == [(head, LARGE + 1) for head in large]
    assert driver.interrupts.used == [0, 0]          # one for the three
    content = image.read_bytes()
    for head, sector in zip(large, (0, 512, 1024)):
        assert q.written(head) == content[sector * 512:sector * 512 + LARGE] + bytes([S_OK])
    stats = device.stats()
    assert (stats["reads"], stats["bytes_read"], stats["threaded"]) == (4, 3 * LARGE + 4096, 3)


def test_large_writes_move_on_the_threads_only_in_writeback_mode(disk, threads, image, monkeypatch):
    device, driver = disk
    q = driver.queue(0)
    data = pattern(LARGE, seed=77)
    head = add_write(driver, 100, data)
    device.notify(0)
    assert q.take_used() == [] and len(threads.started) == 1
    threads.end()
    assert q.take_used() == [(head, 1)] and q.written(head) == bytes([S_OK])
    assert image.read_bytes()[100 * 512:100 * 512 + LARGE] == data

    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    device.write_config(32, b"\x00")                  # writethrough: synced before completion, in place
    data = pattern(LARGE, seed=78)
    head = add_write(driver, 300, data)
    device.notify(0)
    assert q.take_used() == [(head, 1)] and not threads.started and len(synced) == 2
    assert image.read_bytes()[300 * 512:300 * 512 + LARGE] == data


def test_a_write_that_ends_after_a_switch_to_writethrough_is_synced_first(disk, threads, monkeypatch):
    device, driver = disk
    head = add_write(driver, 100, pattern(LARGE))
    device.notify(0)
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    device.write_config(32, b"\x00")
    assert len(synced) == 1
    threads.end()
    assert driver.queue(0).take_used() == [(head, 1)] and len(synced) == 2


def test_a_failed_transfer_is_an_io_error(disk, threads, caplog):
    device, driver = disk
    head = add_read(driver, 0, LARGE)
    device.notify(0)
    with caplog.at_level(logging.WARNING):
        threads.end(errno.EIO)
    q = driver.queue(0)
    assert q.take_used() == [(head, LARGE + 1)] and q.written(head)[-1] == S_IOERR
    assert device.stats()["errors"] == 1 and device.stats()["reads"] == 0
    assert "read failed" in caplog.text


def test_requests_that_fail_their_checks_are_answered_in_place(disk, threads):
    device, driver = disk
    beyond = add_read(driver, IMAGE // 512 - 8, LARGE)   # runs past the disk's end
    partial = add_read(driver, 0, LARGE + 100, pieces=1)  # not whole sectors
    device.notify(0)
    q = driver.queue(0)
    assert [head for head, _ in q.take_used()] == [beyond, partial] and not threads.started
    assert q.written(beyond)[-1] == S_IOERR and q.written(partial)[-1] == S_IOERR


def test_a_reset_waits_for_the_data_and_drops_what_ends_after_it(disk, threads, memory):
    device, driver = disk
    head = add_read(driver, 0, LARGE)
    device.notify(0)
    device.reset()
    assert threads.idle_waits == 1
    threads.end()
    assert driver.queue(0).take_used() == []         # the driver gave the request up
    assert driver.interrupts.used == []
    assert driver.queue(0).written(head)[-1] == 0    # its status byte untouched (the fake driver's zeroes)


def test_a_save_waits_and_a_restored_device_does_the_request_again(disk, threads, memory, image):
    device, driver = disk
    head = add_read(driver, 512, LARGE)
    device.notify(0)
    state = through_json(device.save())
    assert threads.idle_waits == 1
    restored = VirtioBlock(image, lock=False)
    try:
        restored.attach(memory, driver.interrupts)
        restored.restore(state)
        restored.notify(0)
        q = driver.queue(0)
        assert q.take_used() == [(head, LARGE + 1)]
        assert q.written(head) == image.read_bytes()[512 * 512:512 * 512 + LARGE] + bytes([S_OK])
    finally:
        restored.close()


def test_one_that_ends_after_a_restore_of_the_same_device_is_dropped(disk, threads):
    device, driver = disk
    add_read(driver, 0, LARGE)
    device.notify(0)
    state = device.save()
    device.restore(state)
    threads.end()
    assert driver.queue(0).take_used() == []
    device.notify(0)                                  # handed out again by the restored queue
    threads.end()
    assert len(driver.queue(0).take_used()) == 1


def test_close_and_hand_over_wait_for_the_data(disk, threads):
    device, driver = disk
    add_write(driver, 0, pattern(LARGE))
    device.notify(0)
    device.hand_over_image()
    assert threads.idle_waits == 1
    device.take_back_image()
    add_write(driver, 400, pattern(LARGE))
    device.notify(0)
    interrupts = list(driver.interrupts.used)
    device.close()
    assert threads.idle_waits == 2
    threads.end()                                     # after close (an unplugged disk): dropped
    assert driver.queue(0).take_used() == [] and driver.interrupts.used == interrupts


# --- the C threads -------------------------------------------------------------------------------------

# Guest RAM of two regions with a hole between them, as (guest base, mapping).
LOW, HIGH = 0, 1 << 32
SIZE = 4 << 20


@pytest.fixture
def native():
    module = c_module("pyvmm.host.transfer_threads")
    if module is None:
        pytest.skip("transfer_threads is not built (scripts/compile) or PYVMM_COMPILED=0")
    transfers = module.Transfers(2)
    yield transfers
    transfers.close()


@pytest.fixture
def ram():
    low, high = mmap.mmap(-1, SIZE), mmap.mmap(-1, SIZE)
    yield low, high
    low.close()
    high.close()


def regions(ram):
    return [(LOW, ram[0]), (HIGH, ram[1])]


def take_all(transfers, count: int) -> list:
    ended: list = []
    while len(ended) < count:
        assert transfers.wait_idle(10)
        ended += transfers.take()
    return ended


def test_the_threads_move_the_bytes_asked_between_a_file_and_guest_pieces(native, ram, image):
    low, high = ram
    content = image.read_bytes()
    # reads: uneven pieces in both regions, an empty one, the first 100 bytes skipped, the last piece cut
    pieces = [(LOW + 40, 60), (LOW + 4096, 0), (HIGH + 8192, 5000), (LOW + (1 << 20), 300000), (HIGH + (2 << 20), 9999)]
    native.start("read", False, os.open(image, os.O_RDONLY), 4096, regions(ram), pieces, 100, 5000 + 300000 - 40)
    assert take_all(native, 1) == [("read", 0)]
    got = bytes(high[8192 + 40:8192 + 5000]) + bytes(low[1 << 20:(1 << 20) + 300000 - 80])
    assert got == content[4096:4096 + len(got)]
    assert bytes(low[40:100]) == bytes(60) and bytes(high[2 << 20:(2 << 20) + 9999]) == bytes(9999)  # skipped; beyond
    # writes: guest RAM into the file
    high[1 << 20:(1 << 20) + 70000] = pattern(70000, seed=9)
    fd = os.open(image, os.O_RDWR)
    try:
        native.start("write", True, fd, 1000, regions(ram),
                     [(HIGH + (1 << 20), 30000), (HIGH + (1 << 20) + 30000, 40000)], 0, 70000)
        assert take_all(native, 1) == [("write", 0)]
    finally:
        os.close(fd)
    assert image.read_bytes()[1000:71000] == pattern(70000, seed=9)


def test_errors_come_back_as_errno(native, ram, image):
    fd = os.open(image, os.O_RDONLY)
    read_end, write_end = os.pipe()
    try:
        native.start("past-the-end", False, fd, IMAGE - 512, regions(ram), [(LOW, 4096)], 0, 4096)
        native.start("a-pipe", False, read_end, 0, regions(ram), [(LOW, 4096)], 0, 4096)
        native.start("read-only-file", True, fd, 0, regions(ram), [(LOW, 4096)], 0, 4096)
        assert sorted(take_all(native, 3)) == sorted([("past-the-end", errno.EIO), ("a-pipe", errno.ESPIPE),
                                                      ("read-only-file", errno.EBADF)])
    finally:
        for each in (fd, read_end, write_end):
            os.close(each)


@pytest.mark.parametrize("pieces, skip, length, message", [
    ([(LOW + SIZE - 100, 200)], 0, 200, "not inside one region"),       # past a region's end
    ([(SIZE, 100)], 0, 100, "not inside one region"),                   # in the hole
    ([(LOW, 100)], 0, 200, "fewer than asked"),
    ([(LOW, 100)], 100, 1, "fewer than asked"),                         # all skipped
    ([((1 << 64) - 10, 100)], 50, 10, "wraps around"),
    ([(LOW, 100, 1)], 0, 100, "a piece is"),
    ([(LOW, -1)], 0, 100, "negative"),
    ([(LOW, SIZE + 1)], 0, SIZE + 1, "not inside one region"),          # longer than its region
    ([[LOW, 100]], 0, 100, "a piece is .* not list"),
])
def test_pieces_outside_guest_ram_or_short_are_refused_and_nothing_is_queued(native, ram, pieces, skip, length,
                                                                               message):
    with pytest.raises((ValueError, TypeError, OverflowError), match=message):
        native.start("bad", False, 0, 0, regions(ram), pieces, skip, length)
    assert native.moving == 0 and native.take() == []


def test_guest_ram_is_held_until_taken_and_read_only_ram_refused_for_reads(native, image):
    area = mmap.mmap(-1, 1 << 20)
    fd = os.open(image, os.O_RDONLY)
    try:
        native.start("held", False, fd, 0, [(0, area)], [(0, 4096)], 0, 4096)
        assert native.wait_idle(10)
        with pytest.raises(BufferError):
            area.close()                             # guest RAM cannot go while a transfer holds it
        assert native.take() == [("held", 0)]
        with pytest.raises(BufferError):
            native.start("read-into-bytes", False, fd, 0, [(0, b"not writable")], [(0, 4)], 0, 4)
        assert native.moving == 0
    finally:
        os.close(fd)
    area.close()


def test_many_transfers_each_end_once_and_count_on_the_eventfd(native, ram, image):
    low = ram[0]
    fd = os.open(image, os.O_RDONLY)
    try:
        for token in range(300):
            native.start(token, False, fd, (token % 64) * 4096, regions(ram), [(LOW + token * 8192, 4096)], 0, 4096)
        ended = take_all(native, 300)
    finally:
        os.close(fd)
    assert sorted(token for token, _ in ended) == list(range(300)) and {e for _, e in ended} == {0}
    assert os.eventfd_read(native.fd) == 300 and native.moving == 0
    content = image.read_bytes()
    assert all(bytes(low[t * 8192:t * 8192 + 4096]) == content[(t % 64) * 4096:(t % 64 + 1) * 4096]
               for t in range(0, 300, 37))


def test_bad_arguments_and_a_closed_one_are_refused(native, ram):
    module = c_module("pyvmm.host.transfer_threads")
    for count in (0, 65):
        with pytest.raises(ValueError, match="threads"):
            module.Transfers(count)
    with pytest.raises(ValueError):
        native.wait_idle(-1)
    for fd, offset, skip, length in ((-1, 0, 0, 0), (0, -1, 0, 0), (0, 0, -1, 0), (0, 0, 0, -1)):
        with pytest.raises(ValueError):
            native.start("negative", False, fd, offset, regions(ram), [], skip, length)
    with pytest.raises(TypeError):
        native.start("not-regions", False, 0, 0, [1], [], 0, 0)
    fd = native.fd
    native.close()
    assert native.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)                                 # the eventfd went with it
    with pytest.raises(RuntimeError, match="closed"):
        native.start("late", False, 0, 0, regions(ram), [], 0, 0)
    assert native.wait_idle(0) is True


# --- the VM's DiskTransfers on an I/O thread ------------------------------------------------------------


def test_disk_transfers_hand_each_device_its_ended_transfers_on_the_io_thread(memory, image):
    if not disk_transfers.available({}):
        pytest.skip("transfer_threads is not built (scripts/compile) or PYVMM_COMPILED=0")
    iothread = IoThread(name="test-io")
    iothread.start()
    transfers = disk_transfers.DiskTransfers(iothread, threads=2)
    got: dict[str, list] = {"a": [], "b": []}
    seen_on: set[str] = set()
    done = threading.Event()

    def finished_by(name):
        def finished(items):
            seen_on.add(threading.current_thread().name)
            got[name] += items
            if len(got["a"]) + len(got["b"]) == 5:
                done.set()
        return finished

    fd = os.open(image, os.O_RDONLY)
    try:
        a, b = finished_by("a"), finished_by("b")
        for index in range(5):
            transfers.start(a if index % 2 else b, index, False, fd, index * 4096, memory,
                            [(0x10000 + index * 4096, 4096)], 0, 4096)
        assert done.wait(10)
    finally:
        transfers.close()
        iothread.stop()
        os.close(fd)
    assert sorted(got["a"]) == [(1, 0), (3, 0)] and sorted(got["b"]) == [(0, 0), (2, 0), (4, 0)]
    assert seen_on == {"test-io"}
    assert memory.read(0x10000, 5 * 4096) == image.read_bytes()[:5 * 4096]
    with pytest.raises(RuntimeError, match="closed"):
        transfers.start(a, 9, False, 0, 0, memory, [], 0, 0)


def test_the_thread_count_setting(monkeypatch):
    assert disk_transfers.wanted_threads({}) == disk_transfers.DEFAULT_THREADS
    assert disk_transfers.wanted_threads({"PYVMM_DISK_THREADS": "3"}) == 3
    assert not disk_transfers.available({"PYVMM_DISK_THREADS": "0"})
    for bad in ("-1", "many", "65"):
        with pytest.raises(disk_transfers.ConfigError, match="PYVMM_DISK_THREADS"):
            disk_transfers.wanted_threads({"PYVMM_DISK_THREADS": bad})
