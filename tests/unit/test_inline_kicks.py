"""Who serves a kick that reaches a virtio transport (inline_kicks.py): the thread that made it,
for a disk or a NIC whose work the accelerator can take in place, else the I/O thread; and what
a device served in place holds back until the guest's slice ends (its kicks and interrupts)."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

import pytest

from helpers.virtio_driver import FakeDriver, needs_kick
from pyvmm.devices.virtio.blk import VirtioBlock
from pyvmm.devices.virtio import net_tx_thread
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.inline_kicks import BACKOFF_NS, PROBE_EVERY, SLOW_NS, SLOW_STREAK, InlineKicks
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.net.tap import FdBackend


class Accel:
    """serve_device_work as the software CPU's, in a vCPU's slice or not (`in_slice`); end_slice()
    runs what the work left for the slice's end (`at_hlt`: the guest stopped at a HLT)."""

    def __init__(self, clock=None, in_slice: bool = True) -> None:
        self.in_slice, self.clock, self.asked = in_slice, clock, 0
        self.after: dict = {}
        self.ends: list[bool] = []  # each kick served: whether it ended its slice
        self.slice_ended_at_hlt = False

    def serve_device_work(self, work, after) -> bool:
        self.asked += 1
        if not self.in_slice:
            return False
        self.ends.append(False)
        done = work()
        if self.clock is not None:
            self.clock.now += self.clock.work_ns  # how long the work took
        if done:
            self.after[after] = None
        return done

    def end_running_slice(self) -> None:
        self.ends[-1] = True

    def end_slice(self, at_hlt: bool = True) -> None:
        self.slice_ended_at_hlt = at_hlt
        after, self.after = self.after, {}
        for finish in after:
            finish()


class IoThread:
    def __init__(self) -> None:
        self.calls: list = []

    def call_soon(self, callback) -> None:
        self.calls.append(callback)

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for call in calls:
            call()


class Clock:
    def __init__(self) -> None:
        self.now, self.work_ns = 10**9, 30_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def disk(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 4096)
    with GuestMemory.from_specs([RegionSpec(0, 8 << 20)]) as memory:
        device = VirtioBlock(image)
        driver = FakeDriver(memory, device, queue_size=16)
        yield device, driver.queue(0), driver.interrupts
        device.close()


def read_sector(queue, sector: int) -> int:
    return queue.add([struct.pack("<IIQ", 0, 0, sector)], [512, 1])


def served(queue) -> int:
    return len(queue.take_used())


def test_a_disk_kick_is_served_where_it_was_made(disk):
    device, queue, interrupts = disk
    accel, iothread = Accel(), IoThread()
    kicks = InlineKicks(device, accel, iothread)
    head = read_sector(queue, 1)
    kicks(0)
    assert queue.take_used() == [(head, 513)] and iothread.calls == []
    assert queue.written(head)[:512] == bytes(range(256)) * 2  # sector 1 ...
    assert queue.written(head)[512] == 0                       # ... and status OK
    assert interrupts.used == []  # held until the slice ends
    accel.end_slice()
    assert interrupts.used == [0]


def host_readable(sock) -> bool:
    return bool(select.select([sock], [], [], 0.05)[0])


def test_a_frame_to_send_leaves_at_the_kick_and_later_ones_at_the_slice_end():
    device_side, host_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host_side.settimeout(5)
    with device_side, host_side, GuestMemory.from_specs([RegionSpec(0, 8 << 20)]) as memory:
        iothread = IoThread()
        device = VirtioNet(FdBackend(device_side.fileno()), mac=bytes.fromhex("525400123456"), iothread=iothread,
                           queue_size=16, tx_thread=False)
        driver = FakeDriver(memory, device)
        iothread.calls.clear()  # (activation asked the I/O thread to watch for received frames)
        accel = Accel()
        kicks = InlineKicks(device, accel, iothread)
        tx = driver.queue(1)
        frame, later = bytes(12) + b"\x02" * 60, bytes(12) + b"\x03" * 60
        head = tx.add([frame], [])
        kicks(1)
        assert host_side.recv(256) == frame and iothread.calls == []
        assert tx.take_used() == [(head, 0)] and driver.interrupts.used == []
        old = tx.avail_idx
        tx.add([later], [])  # later in the same slice: no kick asked for, it waits for the slice's end
        assert not needs_kick(tx.avail_event(), tx.avail_idx, old)
        assert not host_readable(host_side)
        accel.end_slice()
        assert host_side.recv(256) == later and driver.interrupts.used == [1]
        assert len(tx.take_used()) == 1 and device.stats()["tx_packets"] == 2
        old = tx.avail_idx
        tx.add([frame], [])
        assert needs_kick(tx.avail_event(), tx.avail_idx, old)  # asked for again


@pytest.mark.skipif(not net_tx_thread.built(), reason="the transmit thread is not built (scripts/compile)")
def test_a_kick_for_the_transmit_thread_only_wakes_it(iothread):
    """With a transmit thread nothing waits for the slice's end: the first kick lends it the
    queue, a frame added later in the slice leaves at once, and the interrupt comes from the
    I/O thread, never from inside the guest's kick."""
    device_side, host_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host_side.settimeout(5)
    device_side.setblocking(False)
    with device_side, host_side, GuestMemory.from_specs([RegionSpec(0, 8 << 20)]) as memory:
        device = VirtioNet(FdBackend(device_side.fileno()), mac=bytes.fromhex("525400123456"), iothread=iothread,
                           queue_size=16, tx_thread=True, rx_thread=False)
        driver = FakeDriver(memory, device)
        accel = Accel()
        kicks = InlineKicks(device, accel, iothread)
        tx = driver.queue(1)
        frame, later = bytes(12) + b"\x02" * 60, bytes(12) + b"\x03" * 60
        tx.add([frame], [])
        kicks(1)
        assert host_side.recv(256) == frame
        assert device._tx_thread is not None and device._tx_thread.serving
        old = tx.avail_idx
        tx.add([later], [])
        if needs_kick(tx.avail_event(), tx.avail_idx, old):
            kicks(1)
        assert host_side.recv(256) == later  # the slice has not ended
        deadline = time.monotonic() + 5
        while tx.used_idx() != 2 or not driver.interrupts.used:
            assert time.monotonic() < deadline, "the frames were not returned with an interrupt"
            time.sleep(0.002)
        assert len(tx.take_used()) == 2 and driver.interrupts.used == [1]
        assert device.stats()["tx_thread_frames"] == 2
        accel.end_slice()  # nothing was held for it
        assert not host_readable(host_side)
        device.stop_io_threads()


def test_a_kick_the_accelerator_cannot_take_in_place_goes_to_the_io_thread(disk):
    device, queue, interrupts = disk
    accel, iothread = Accel(in_slice=False), IoThread()
    kicks = InlineKicks(device, accel, iothread)
    read_sector(queue, 1)
    kicks(0)
    assert served(queue) == 0 and len(iothread.calls) == 1
    iothread.run()
    assert served(queue) == 1


def test_a_device_busy_on_another_thread_is_left_to_the_io_thread(disk):
    device, queue, interrupts = disk
    iothread = IoThread()
    kicks = InlineKicks(device, Accel(), iothread)
    read_sector(queue, 1)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with device.lock:
            holding.set()
            release.wait(10)

    other = threading.Thread(target=hold)
    other.start()
    holding.wait(10)
    try:
        kicks(0)  # returns at once: the vCPU never waits for the device's lock
        assert served(queue) == 0 and len(iothread.calls) == 1
    finally:
        release.set()
        other.join()
    iothread.run()
    assert served(queue) == 1


def test_a_device_that_is_not_quick_is_never_served_in_place():
    with GuestMemory.from_specs([RegionSpec(0, 8 << 20)]) as memory:
        device = VirtioRng(source=lambda n: b"\x5a" * n)
        queue = FakeDriver(memory, device, queue_size=8).queue(0)
        accel, iothread = Accel(), IoThread()
        kicks = InlineKicks(device, accel, iothread)
        queue.add([], [16])
        kicks(0)
        assert accel.asked == 0 and served(queue) == 0
        iothread.run()
        assert served(queue) == 1


def _read_in_place(kicks, accel, queue, sector: int) -> None:
    read_sector(queue, sector)
    kicks(0)
    accel.end_slice()
    assert served(queue) == 1


def test_slow_kicks_in_a_row_send_the_next_ones_to_the_io_thread_for_a_while(disk):
    device, queue, interrupts = disk
    clock, iothread = Clock(), IoThread()
    accel = Accel(clock)
    kicks = InlineKicks(device, accel, iothread, clock=clock)
    _read_in_place(kicks, accel, queue, 1)
    clock.work_ns = SLOW_NS + 1  # (reads that miss the host's page cache)
    for sector in range(2, 2 + SLOW_STREAK):
        _read_in_place(kicks, accel, queue, sector)  # served in place, but each took too long
    assert iothread.calls == []
    clock.work_ns = 30_000
    read_sector(queue, 9)
    kicks(0)
    assert served(queue) == 0 and len(iothread.calls) == 1 and accel.asked == 1 + SLOW_STREAK
    iothread.run()
    assert served(queue) == 1
    clock.now += BACKOFF_NS
    _read_in_place(kicks, accel, queue, 10)
    assert iothread.calls == [] and accel.asked == 2 + SLOW_STREAK


def test_a_slow_kick_now_and_then_is_not_a_slow_disk(disk):
    """Wall time: a preemption or another thread's turn with the GIL stretches one kick."""
    device, queue, interrupts = disk
    clock, iothread = Clock(), IoThread()
    accel = Accel(clock)
    kicks = InlineKicks(device, accel, iothread, clock=clock)
    for round_ in range(3):
        for sector in range(SLOW_STREAK - 1):
            clock.work_ns = SLOW_NS + 1
            _read_in_place(kicks, accel, queue, 1 + sector)
        clock.work_ns = 30_000
        _read_in_place(kicks, accel, queue, 20)
    assert iothread.calls == [] and accel.asked == 3 * SLOW_STREAK


def one_read_served_in_place(disk) -> Accel:
    """A kick for one read, served in a slice that has not ended: the accelerator, to end it."""
    device, queue, _ = disk
    accel = Accel()
    read_sector(queue, 1)
    InlineKicks(device, accel, IoThread())(0)
    return accel


def test_requests_added_in_the_same_slice_need_no_kick_and_share_one_interrupt(disk):
    """(At a deeper queue a kick and an interrupt per request would be an exit each.)"""
    device, queue, interrupts = disk
    accel = one_read_served_in_place(disk)
    for sector in (2, 3):
        old = queue.avail_idx
        read_sector(queue, sector)
        assert not needs_kick(queue.avail_event(), queue.avail_idx, old)
    assert served(queue) == 1 and interrupts.used == []
    accel.end_slice()
    assert served(queue) == 2 and interrupts.used == [0]
    old = queue.avail_idx
    read_sector(queue, 4)
    assert needs_kick(queue.avail_event(), queue.avail_idx, old)  # asked for again


def test_after_a_slice_that_added_nothing_more_kicks_are_asked_for_again(disk):
    device, queue, interrupts = disk
    accel = one_read_served_in_place(disk)
    accel.end_slice()
    assert served(queue) == 1 and interrupts.used == [0] and not device.queues[0].kicks_suppressed
    old = queue.avail_idx
    read_sector(queue, 2)
    assert needs_kick(queue.avail_event(), queue.avail_idx, old)


def test_a_ring_broken_by_the_slices_end_marks_the_device_for_reset(disk):
    device, queue, interrupts = disk
    accel = one_read_served_in_place(disk)
    queue.set_avail_idx(queue.avail_idx + 100)  # more entries than the queue has
    accel.end_slice()
    assert device.broken and "available index" in device.broken


def test_serve_in_place_serves_only_when_the_lock_is_free(disk):
    device, queue, interrupts = disk
    read_sector(queue, 5)
    result: list[bool] = []
    with device.lock:  # held by this thread: the lock is re-entrant, so it serves
        assert device.serve_in_place(0) is True
    assert served(queue) == 1
    device.finish_in_place()
    read_sector(queue, 6)
    with device.lock:
        other = threading.Thread(target=lambda: result.append(device.serve_in_place(0)))
        other.start()
        other.join()
    assert result == [False] and served(queue) == 0
    assert device.serve_in_place(7) is False  # no such queue


def test_a_reset_while_held_leaves_a_fresh_queue(disk):
    device, queue, interrupts = disk
    read_sector(queue, 1)
    assert device.serve_in_place(0)
    device.reset()
    device.finish_in_place()  # the slice's end after the driver reset the device: nothing to do
    assert not device.queues[0].kicks_held and not device.queues[0].kicks_suppressed


def test_a_guest_waiting_for_each_request_gets_its_kicks_ending_their_slice(disk):
    """Nothing added in the slice after the kick (iodepth 1): the next kicks end their slice, so
    the interrupt comes at once; every PROBE_EVERY-th lets its slice run on to look again."""
    device, queue, interrupts = disk
    accel = Accel()
    kicks = InlineKicks(device, accel, IoThread())
    for sector in range(1 + 2 * (PROBE_EVERY + 1)):
        _read_in_place(kicks, accel, queue, sector % 64)
    assert accel.ends == [False] + ([True] * PROBE_EVERY + [False]) * 2


@pytest.mark.parametrize("adds_more, idles", [(True, True), (False, False)], ids=["adds-more", "does-not-idle"])
def test_a_guest_adding_requests_or_not_idling_keeps_one_interrupt_per_slice(disk, adds_more, idles):
    """fio at iodepth 32 adds requests in the slice: a kick ending each slice would make it a kick
    and an interrupt per request. A slice ended by its time or another interrupt, not at the
    guest's HLT, says nothing about what the guest waits for."""
    device, queue, interrupts = disk
    accel = Accel()
    kicks = InlineKicks(device, accel, IoThread())
    for round_ in range(3):
        read_sector(queue, 1)
        kicks(0)
        if adds_more:
            read_sector(queue, 2)  # no kick asked for: served at the slice's end
        accel.end_slice(at_hlt=idles)
        assert served(queue) == 1 + adds_more
    assert accel.ends == [False] * 3


def test_a_probe_that_finds_more_requests_stops_ending_slices(disk):
    device, queue, interrupts = disk
    accel = Accel()
    kicks = InlineKicks(device, accel, IoThread())
    for sector in range(1 + PROBE_EVERY):
        _read_in_place(kicks, accel, queue, sector)
    read_sector(queue, 40)
    kicks(0)  # the probe: its slice runs on, and the guest adds another request
    read_sector(queue, 41)
    accel.end_slice()
    assert served(queue) == 2
    _read_in_place(kicks, accel, queue, 42)
    assert accel.ends == [False] + [True] * PROBE_EVERY + [False, False]


class HandingOver:
    """A device whose kicks hand their requests to other threads (a large disk transfer):
    served in place, nothing completed there."""

    name, quick_queues, completions_awaited = "handing-over", True, True

    def __init__(self) -> None:
        self.queues = [VirtioRng(source=bytes).queues[0]]

    def serve_in_place(self, queue_index: int) -> bool:
        return True

    def finish_in_place(self) -> bool:
        return False  # nothing came: the guest waits (for the transfer)


def test_a_kick_whose_requests_complete_elsewhere_does_not_end_its_slice():
    device, accel = HandingOver(), Accel()
    kicks = InlineKicks(device, accel, IoThread())
    for _ in range(4):
        kicks(0)
        accel.end_slice()
    assert accel.ends == [False] * 4 and kicks.ending_slices  # (the interrupt comes when it is done)


def test_a_nic_whose_guest_idles_after_sending_keeps_one_interrupt_per_slice():
    """(A sent frame's buffer comes back whenever: the guest waits for what it receives.)"""
    device_side, host_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with device_side, host_side, GuestMemory.from_specs([RegionSpec(0, 8 << 20)]) as memory:
        iothread = IoThread()
        device = VirtioNet(FdBackend(device_side.fileno()), mac=bytes.fromhex("525400123456"), iothread=iothread,
                           queue_size=16, tx_thread=False)
        tx = FakeDriver(memory, device).queue(1)
        accel = Accel()
        kicks = InlineKicks(device, accel, iothread)
        for _ in range(3):
            tx.add([bytes(12) + b"\x02" * 60], [])
            kicks(1)
            accel.end_slice()  # at a HLT, nothing more sent
            assert len(tx.take_used()) == 1
        assert accel.ends == [False] * 3
