"""virtio-net's receive queue lent to its C thread (net_receiver.c, net_rx_thread.py): frames land
in the guest's mergeable buffers without the I/O thread, and the queue comes back exactly (held
buffers, a half-placed frame, the ring indices) at a pause, a save, a link or limit change, a
reset, and at whatever the thread does not serve. test_virtio_net.py runs the device's general
tests on this path too."""

import os
import socket
import struct
import time

import pytest

from helpers.state import through_json
from helpers.polling import wait_for
from helpers.virtio_driver import FakeDriver
from pyvmm.devices.rate_limiter import RateLimit, TokenBucketConfig
from pyvmm.devices.virtio import net_rx_thread
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX
from pyvmm.devices.virtio.net import MAX_FRAME, NET_HDR_SIZE, VirtioNet
from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, SplitQueue
from pyvmm.errors import ConfigError
from pyvmm.iothread import IoThread
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.net.tap import FdBackend

pytestmark = pytest.mark.skipif(not net_rx_thread.available(),
                                reason="the receive thread is not built (scripts/compile) or PYVMM_COMPILED=0")

MAC = bytes.fromhex("525400123456")
RX, TX = 0, 1
HDR = NET_HDR_SIZE


def net_hdr(num_buffers=0) -> bytes:
    return struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, num_buffers)


def frame(size: int, seed: int = 0) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(size))


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, 4 << 20)]) as mem:
        mem.fill(0, 4 << 20, 0xEE)
        yield mem


def make(memory, iothread, wire, *, features_off=0, queue_size=64, **kw):
    device = VirtioNet(FdBackend(wire[0].fileno()), mac=MAC, iothread=iothread, queue_size=queue_size,
                       rx_thread=True, tx_thread=False, **kw)
    driver = FakeDriver(memory, device, features=device.offered_features & ~features_off)
    return device, driver


def lent_with_buffers(memory, iothread, wire, count, size):
    """A device whose receive queue is lent, the driver having posted `count` buffers of `size`."""
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    for _ in range(count):
        q.add([], [size])
    device.notify(RX)
    wait_for(lambda: lent(device))
    return device, driver, q


def lent(device) -> bool:
    with device.lock:
        return device._rx_thread is not None and device._rx_thread.serving


def received(q, count):
    """The next `count` used entries' (head, length), waiting for them."""
    wait_for(lambda: (q.used_idx() - q.last_used) & 0xFFFF >= count)
    return q.take_used()


# --- the device on its receive thread -----------------------------------------------------------------

def test_frames_spread_over_page_buffers_with_num_buffers(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    heads = [q.add([], [4096]) for _ in range(40)]
    device.notify(RX)
    wait_for(lambda: lent(device))
    frames = [frame(10000, seed=n) for n in range(3)]
    for data in frames:
        wire[1].send(net_hdr() + data)
    used = received(q, 9)
    assert [head for head, _ in used] == heads[:9]
    for n, data in enumerate(frames):
        pieces = used[3 * n:3 * n + 3]
        assert [length for _, length in pieces] == [4096, 4096, HDR + 10000 - 8192]
        got = b"".join(q.written(head)[:length] for head, length in pieces)
        assert struct.unpack_from("<H", got, 10)[0] == 3  # num_buffers
        assert got[HDR:] == data
    wait_for(lambda: RX in driver.interrupts.used)  # (the used ring is published before the interrupt is raised)
    stats = device.stats()
    assert stats["rx_packets"] == 3 and stats["rx_bytes"] == 30000 and stats["rx_dropped"] == 0
    assert stats["rx_thread_frames"] == 3 and stats["rx_thread_handbacks"] == 0
    assert device.rx_thread_stops == {} and lent(device)
    assert device.queue_counters()["requests"] == 9


def test_a_largest_frame_and_an_oversized_one(memory, iothread, wire):
    device, driver, q = lent_with_buffers(memory, iothread, wire, 40, 4096)
    largest = frame(MAX_FRAME, seed=3)
    wire[1].send(net_hdr() + largest)
    used = received(q, 17)
    assert sum(length for _, length in used) == HDR + MAX_FRAME
    assert b"".join(q.written(head)[:length] for head, length in used)[HDR:] == largest
    assert device.stats()["rx_dropped"] == 0


def test_a_frame_larger_than_the_buffers_held_is_finished_by_the_io_thread(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    first = q.add([], [64])
    device.notify(RX)
    wait_for(lambda: lent(device))
    payload = frame(100, seed=1)
    wire[1].send(net_hdr() + payload)
    wait_for(lambda: not lent(device))  # handed over half-placed: the guest is short of buffers
    assert q.used_idx() == 0
    assert device.rx_thread_stops == {"a frame larger than the buffers held": 1}
    second = q.add([], [64])
    device.notify(RX)
    used = received(q, 2)
    assert used == [(first, 64), (second, HDR + 100 - 64)]
    data = q.written(first) + q.written(second)[:HDR + 100 - 64]
    assert struct.unpack_from("<H", data, 10)[0] == 2 and data[HDR:] == payload
    q.add([], [4096])
    device.notify(RX)
    wait_for(lambda: lent(device))  # lent again at a kick
    wire[1].send(net_hdr() + frame(50, seed=9))
    assert received(q, 1)[0][1] == HDR + 50
    stats = device.stats()
    assert stats["rx_packets"] == 2 and stats["rx_thread_frames"] == 1 and stats["rx_thread_handbacks"] == 1


@pytest.mark.parametrize("kind", ["readable", "indirect", "outside"])
def test_what_the_thread_does_not_serve_goes_to_the_io_thread(memory, iothread, wire, kind):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    good = q.add([], [4096])
    device.notify(RX)
    wait_for(lambda: lent(device))
    wire[1].send(net_hdr() + frame(30))
    assert received(q, 1) == [(good, HDR + 30)]
    if kind == "readable":
        odd = q.add([b"x" * 16], [4096])
    elif kind == "indirect":
        odd = q.add([], [4096], indirect=True)
    else:
        odd = q.next_free
        q.put_descriptor(odd, 64 << 20, 4096, VIRTQ_DESC_F_WRITE)
        q.next_free += 1
        q.publish(odd)
    device.notify(RX)
    wait_for(lambda: device.rx_thread_stops)
    wire[1].send(net_hdr() + frame(40))
    if kind == "outside":  # the I/O thread's own verdict: a malformed chain, returned empty
        assert received(q, 1) == [(odd, 0)]
        assert device.queue_counters()["malformed_chains"] == 1
        later = q.add([], [4096])
        device.notify(RX)
        assert received(q, 1) == [(later, HDR + 40)]
    elif kind == "indirect" and not device.has_feature(1 << 28):
        wait_for(lambda: device.broken is not None)  # no VIRTIO_F_INDIRECT_DESC: the ring is broken
    else:
        assert received(q, 1) == [(odd, HDR + 40)]
    assert len(device.rx_thread_stops) == 1


def test_kicks_are_asked_for_only_when_no_buffer_is_left(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)  # (EVENT_IDX: the device says which add kicks)
    q = driver.queue(RX)
    a, b = q.add([], [2048]), q.add([], [2048])
    device.notify(RX)
    wait_for(lambda: lent(device) and device._rx_thread.holding == 2)
    assert q.avail_event() == 0  # buffers held: the driver's adds need no kick
    wire[1].send(net_hdr() + frame(30))
    wire[1].send(net_hdr() + frame(40, seed=1))
    assert received(q, 2) == [(a, HDR + 30), (b, HDR + 40)]
    wait_for(lambda: q.avail_event() == 2)  # none left: the next add kicks
    c = q.add([], [2048])
    device.notify(RX)
    wire[1].send(net_hdr() + frame(50, seed=2))
    assert received(q, 1) == [(c, HDR + 50)]
    device.set_link(False)  # taken back: the I/O thread's next kick is asked for too
    assert q.avail_event() == 3


def test_pause_takes_the_queue_back_with_the_buffers_held(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    a, b = q.add([], [2048]), q.add([], [2048])
    device.notify(RX)
    wire[1].send(net_hdr() + frame(30))
    assert received(q, 1) == [(a, HDR + 30)]
    wait_for(lambda: device._rx_thread.holding == 1)  # b taken, waiting for a frame
    assert q.avail_event() == 0  # holding buffers, the thread needs no kick for more
    iothread.pause()
    try:
        assert not lent(device)
        state = through_json(device.save())
        assert state.virtio.queues[RX].in_flight == (b,) and state.virtio.queues[RX].last_avail == 2
        assert state.virtio.queues[RX].used_idx == 1 and state.counters["rx_packets"] == 1
        wire[1].send(net_hdr() + frame(40, seed=2))
        time.sleep(0.05)
        assert q.used_idx() == 1  # nothing moves while paused
    finally:
        iothread.resume()
    assert received(q, 1) == [(b, HDR + 40)]
    wait_for(lambda: lent(device))


def test_a_state_saved_while_lent_restores_onto_the_thread(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    a, b, c = (q.add([], [2048]) for _ in range(3))
    device.notify(RX)
    wire[1].send(net_hdr() + frame(30))
    assert received(q, 1) == [(a, HDR + 30)]
    wait_for(lambda: device._rx_thread.holding == 2)
    state = through_json(device.save())  # takes the queue back itself when not paused
    assert state.virtio.queues[RX].in_flight == (b, c)
    device.reset()
    other_device, other_host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with other_device, other_host:
        restored = VirtioNet(FdBackend(other_device.fileno()), mac=MAC, iothread=iothread, queue_size=64,
                             rx_thread=True)
        restored.attach(memory, driver.interrupts)
        restored.restore(state)
        wait_for(lambda: lent(restored))  # the buffers in flight at the save are the thread's first
        other_host.send(net_hdr() + frame(40, seed=2))
        other_host.send(net_hdr() + frame(50, seed=3))
        assert received(q, 2) == [(b, HDR + 40), (c, HDR + 50)]
        restored.reset()
        assert not lent(restored)


def test_link_and_rate_limit_changes_take_the_queue_back(memory, iothread, wire):
    device, driver, q = lent_with_buffers(memory, iothread, wire, 4, 2048)
    device.set_link(False)
    assert not lent(device)
    wire[1].send(net_hdr() + frame(30))
    wait_for(lambda: device.stats()["rx_dropped"] == 1)  # dropped on the I/O thread, as on a wire
    device.set_link(True)
    wait_for(lambda: lent(device))
    device.set_rate_limits(RateLimit(TokenBucketConfig(1 << 20, 1000), None), None)
    assert not lent(device)
    wire[1].send(net_hdr() + frame(30))
    assert received(q, 1)[0][1] == HDR + 30
    assert not lent(device)  # each frame is charged on the I/O thread
    device.set_rate_limits(None, None)
    wait_for(lambda: lent(device))


def test_reset_and_closing_ram_end_the_thread(iothread, wire):
    memory = GuestMemory.from_specs([RegionSpec(0, 4 << 20)])
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    q.add([], [2048])
    device.notify(RX)
    wait_for(lambda: lent(device))
    memory.close()  # the thread's views of RAM are let go with it
    assert device._rx_thread is None
    device.reset()
    assert not lent(device)


def test_the_thread_stops_before_the_back_end_closes(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    q.add([], [2048])
    device.notify(RX)
    wait_for(lambda: lent(device))
    device.stop_io_threads()
    assert device._rx_thread is None
    q.add([], [2048])
    device.notify(RX)  # the I/O thread receives from here on
    wire[1].send(net_hdr() + frame(30))
    assert received(q, 1)[0][1] == HDR + 30
    assert device._rx_thread is None


def test_without_event_idx_and_with_a_small_queue(memory, iothread, wire):
    device, driver = make(memory, iothread, wire, features_off=VIRTIO_F_EVENT_IDX, queue_size=8)
    q = driver.queue(RX)
    for _ in range(8):
        q.add([], [1526])
    device.notify(RX)
    for round_ in range(5):  # the ring refilled as a driver does: the whole of it goes round
        for n in range(6):
            wire[1].send(net_hdr() + frame(1000, seed=n))
        for head, length in received(q, 6):
            assert length == HDR + 1000 and struct.unpack_from("<H", q.written(head), 10)[0] == 1
            q.add([], [1526])
        device.notify(RX)
    assert device.stats()["rx_packets"] == 30 and device.broken is None


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(net_rx_thread.ENV, "0")
    assert not net_rx_thread.available()
    monkeypatch.setenv(net_rx_thread.ENV, "yes")
    with pytest.raises(ConfigError, match="PYVMM_NET_RX_THREAD=yes"):
        net_rx_thread.available()


# --- the C receiver alone, without a thread ------------------------------------------------------------

class Ring:
    """A queue of `size` laid out in guest RAM, the driver's side written by hand."""

    def __init__(self, memory, size=8):
        self.memory, self.size = memory, size
        self.desc, self.avail, self.used = 0x1000, 0x2000, 0x3000
        self.avail_idx, self.next_buffer = 0, 0x10000
        memory.fill(0, 0x4000, 0)

    def add(self, head, pieces, flags=VIRTQ_DESC_F_WRITE):
        for i, length in enumerate(pieces):
            more = VIRTQ_DESC_F_NEXT if i + 1 < len(pieces) else 0
            self.memory.write(self.desc + 16 * (head + i), struct.pack("<QIHH", self.next_buffer, length, flags | more,
                                                                         head + i + 1))
            self.next_buffer += 0x1000
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx += 1
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def used_idx(self):
        return self.memory.read_u16(self.used + 2)

    def receiver(self, fd, **kw):
        os.set_blocking(fd, False)
        module = net_rx_thread.c_module(net_rx_thread.C_MODULE)
        regions = [(int(r.guest_base), r.view) for r in self.memory.regions]
        args = dict(fd=fd, regions=regions, desc_table=self.desc, avail_ring=self.avail, used_ring=self.used,
                    size=self.size, event_idx=False, header=HDR, want=8192, max_pieces=16, threaded=False)
        args.update(kw)
        return module.Receiver(**args)


def test_receiver_stops_at_a_bad_head_without_taking_it(memory, wire):
    ring = Ring(memory)
    receiver = ring.receiver(wire[0].fileno())
    try:
        ring.add(0, [4096])
        ring.memory.write_u16(ring.avail + 4 + 2, 9)  # slot 1 names descriptor 9 of 8
        ring.avail_idx += 1
        ring.memory.write_u16(ring.avail + 2, ring.avail_idx)
        receiver.start(0, 0, [])
        receiver.pump()
        assert not receiver.serving
        chains, frames, length, dropped, used_idx, runs, stopped = receiver.take()
        assert stopped == "a bad head in the available ring" and frames == 0
        last_avail, used_idx, held, partial = receiver.stop()
        assert (last_avail, used_idx, partial) == (1, 0, None)  # slot 1 left for the I/O thread
        assert held == [(0, [(0x10000, 4096)])]
    finally:
        receiver.close()


def test_receiver_round_trips_held_chains_and_reports_written_ranges(memory, wire):
    ring = Ring(memory)
    receiver = ring.receiver(wire[0].fileno())
    try:
        ring.add(0, [4096])
        ring.add(1, [2048, 2048])  # one chain of two pieces, descriptors 1 and 2
        receiver.start(0, 0, [])
        wire[1].send(net_hdr() + frame(5000))
        receiver.pump()
        assert receiver.serving  # waiting for the next frame
        chains, frames, length, dropped, used_idx, runs, stopped = receiver.take()
        assert (chains, frames, length, dropped, used_idx, stopped) == (2, 1, 5000, 0, 2, None)
        assert runs == [(0x10000, HDR + 5000)]  # adjacent pieces: one range
        assert ring.used_idx() == 2 and memory.read_u16(0x10000 + 10) == 2
        assert memory.read(0x10000 + HDR, 4096 - HDR) + memory.read(0x11000, 5000 - 4096 + HDR) == frame(5000)
        ring.add(3, [4096])
        receiver.pump()
        held = receiver.stop()[2]
        assert held == [(3, [(0x13000, 4096)])]
        receiver.start(3, 2, held)  # given back as it was taken
        wire[1].send(net_hdr() + frame(20, seed=4))
        receiver.pump()
        assert receiver.take()[:5] == (1, 1, 20, 0, 3)
        assert memory.read_u32(ring.used + 4 + 8 * 2) == 3
    finally:
        receiver.close()


def test_receiver_refuses_what_it_cannot_serve(memory, wire):
    ring = Ring(memory)
    os.set_blocking(wire[0].fileno(), True)
    with pytest.raises(ValueError, match="not a non-blocking fd"):
        net_rx_thread.c_module(net_rx_thread.C_MODULE).Receiver(
            wire[0].fileno(), [], 0, 0, 0, 8, False, HDR, 8192, 16, False)
    with pytest.raises(ValueError, match="used ring"):
        ring.receiver(wire[0].fileno(), used_ring=(4 << 20) - 8)
    with pytest.raises(ValueError):
        ring.receiver(wire[0].fileno(), size=6)
    receiver = ring.receiver(wire[0].fileno())
    try:
        with pytest.raises(ValueError, match="held chain 8"):
            receiver.start(0, 0, [(8, [(0x10000, 4096)])])
        with pytest.raises(ValueError, match="cannot be held"):
            receiver.start(0, 0, [(0, [(64 << 20, 4096)])])
        with pytest.raises(RuntimeError, match="threaded"):
            ring.receiver(wire[0].fileno(), threaded=True).pump()
    finally:
        receiver.close()
    with pytest.raises(RuntimeError, match="closed"):
        receiver.start(0, 0, [])


def test_lend_refuses_a_queue_with_requests_the_borrower_would_not_hold(memory):
    queue = SplitQueue(8)
    queue._in_flight = {3: None}
    with pytest.raises(ValueError, match="in flight"):
        queue.lend([])
    assert queue.lend([3]) == (0, 0)


def test_io_thread_holds_its_helpers_with_it():
    iothread = IoThread(name="test-holds")
    calls = []
    iothread.hold_with("nic", lambda: calls.append("pause"), lambda: calls.append("resume"))
    iothread.start()
    try:
        iothread.pause()
        assert calls == ["pause"]
        iothread.resume()
        assert calls == ["pause", "resume"]
        iothread.forget_helper("nic")
        iothread.pause()
        iothread.resume()
        assert calls == ["pause", "resume"]
    finally:
        iothread.stop()
