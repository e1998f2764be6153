"""virtio-net against a fake guest driver and a fake TAP (a SOCK_SEQPACKET socket pair).

The device side of the pair is the back-end (one frame, header included, per read/write);
the test side plays the host network. RX runs on a real IoThread, as in a VM, and each test
runs twice: frames received and sent in Python (on the I/O thread, and where the kick is served),
and by the receive and transmit threads (net_rx_thread.py, net_tx_thread.py) where they are built.
"""

import select
import socket
import struct
import time

import pytest

from helpers.state import changed, through_json
from pyvmm.persist import StateError

from helpers.polling import wait_for
from helpers.virtio_driver import FakeDriver
from pyvmm.devices.virtio import net_rx_thread, net_tx_thread
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX
from pyvmm.devices.virtio.net import (
    OFFLOAD_CSUM, OFFLOAD_TSO4, OFFLOAD_TSO6, OFFLOAD_TSO_ECN, OFFLOAD_UFO, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VirtioNet,
)
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.net.tap import FdBackend

MAC = bytes.fromhex("525400123456")
RX, TX = 0, 1
HDR = 12


def net_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, num_buffers=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def frame(size: int, seed: int = 0) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(size))


class OffloadBackend(FdBackend):
    """A fake TAP that claims offloads and records what the device tells it."""

    def __init__(self, fd, offloads):
        super().__init__(fd)
        self.offloads, self.set_calls = offloads, []

    def supported_offloads(self):
        return self.offloads

    def set_offloads(self, flags):
        self.set_calls.append(flags)


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, 4 << 20)]) as mem:
        mem.fill(0, 4 << 20, 0xEE)  # stale bytes the device must overwrite (num_buffers)
        yield mem


RX_THREAD = TX_THREAD = False  # the paths the running test's devices take (net_path)


def pytest_generate_tests(metafunc):
    if "io_thread_receive" not in metafunc.definition.keywords:
        metafunc.parametrize("net_path", ["python", "threads"], indirect=True)


@pytest.fixture(autouse=True)
def net_path(request):
    global RX_THREAD, TX_THREAD
    path = getattr(request, "param", "python")
    if path == "threads" and not (net_rx_thread.available() and net_tx_thread.built()):
        pytest.skip("the receive and transmit threads are not built (scripts/compile) or PYVMM_COMPILED=0")
    RX_THREAD = TX_THREAD = path == "threads"
    yield path
    RX_THREAD = TX_THREAD = False


def make(memory, iothread, wire, *, features_off=0, activate=True, backend=None, **kw):
    backend = backend or FdBackend(wire[0].fileno())
    kw.setdefault("rx_thread", RX_THREAD)
    kw.setdefault("tx_thread", TX_THREAD)
    device = VirtioNet(backend, mac=MAC, iothread=iothread, queue_size=16, **kw)
    features = device.offered_features & ~features_off
    driver = FakeDriver(memory, device, features=features, activate=activate)
    return device, driver


def host_readable(sock, timeout=0.1) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


# --- configuration ------------------------------------------------------------------------------------

def test_config_space_decodes_mac_status_mtu(memory, iothread, wire):
    device, _ = make(memory, iothread, wire, mtu=1400)
    for feature in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU, VIRTIO_NET_F_MRG_RXBUF):
        assert device.offered_features & feature
    mac, status, pairs, mtu = struct.unpack("<6sHHH", device.read_config(0, 12))
    assert (mac, status, pairs, mtu) == (MAC, 1, 1, 1400)
    assert device.read_config(6, 2) == b"\x01\x00"


def test_no_mtu_feature_without_an_mtu_and_no_offloads_on_a_plain_fd(memory, iothread, wire):
    device, _ = make(memory, iothread, wire)
    assert not device.offered_features & (VIRTIO_NET_F_MTU | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM)


def test_bad_mac_or_mtu_is_refused(iothread, wire):
    with pytest.raises(ValueError):
        VirtioNet(FdBackend(wire[0].fileno()), mac=bytes.fromhex("015400123456"), iothread=iothread)
    with pytest.raises(ValueError):
        VirtioNet(FdBackend(wire[0].fileno()), mac=MAC, iothread=iothread, mtu=40)


def test_link_down_and_up_signal_config_changes(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    device.set_link(False)
    assert driver.interrupts.config == 1
    assert device.read_config(6, 2) == b"\x00\x00"
    device.set_link(False)  # no change, no interrupt
    assert driver.interrupts.config == 1
    device.set_link(True)
    assert driver.interrupts.config == 2
    assert device.read_config(6, 2) == b"\x01\x00"


def test_offloads_follow_the_backend_and_the_guest(memory, iothread, wire):
    all_offloads = OFFLOAD_CSUM | OFFLOAD_TSO4 | OFFLOAD_TSO6 | OFFLOAD_TSO_ECN | OFFLOAD_UFO
    backend = OffloadBackend(wire[0].fileno(), all_offloads)
    device = VirtioNet(backend, mac=MAC, iothread=iothread)
    for feature in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_UFO):
        assert device.offered_features & feature
    acked = device.offered_features & ~(VIRTIO_NET_F_GUEST_UFO | (VIRTIO_NET_F_GUEST_TSO4 << 1))  # no GUEST_TSO6
    FakeDriver(memory, device, features=acked)
    assert backend.set_calls[-1] == OFFLOAD_CSUM | OFFLOAD_TSO4 | OFFLOAD_TSO_ECN
    device.reset()
    assert backend.set_calls[-1] == 0
    # TSO without checksum offload makes no sense: nothing is offered
    assert not VirtioNet(OffloadBackend(wire[0].fileno(), OFFLOAD_TSO4), mac=MAC, iothread=iothread) \
        .offered_features & (VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_TSO4)


# --- transmit -------------------------------------------------------------------------------------------

def test_tx_frame_split_over_descriptors_reaches_the_backend_with_its_header(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    header = net_hdr(flags=1, csum_start=34, csum_offset=6)
    payload = frame(100)
    q = driver.queue(TX)
    head = q.add([header[:5], header[5:] + payload[:20], payload[20:60], payload[60:]], [])
    device.notify(TX)
    assert wire[1].recv(4096) == header + payload
    wait_for(lambda: q.used_idx() == 1 and driver.interrupts.used == [TX])
    assert q.take_used() == [(head, 0)]
    assert device.stats()["tx_packets"] == 1 and device.stats()["tx_bytes"] == 100


def test_tx_runt_and_link_down_frames_are_dropped_and_counted(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(TX)
    runt = q.add([b"short"], [])
    device.notify(TX)
    wait_for(lambda: q.used_idx() == 1)
    device.set_link(False)
    down = q.add([net_hdr() + frame(60)], [])
    device.notify(TX)
    wait_for(lambda: q.used_idx() == 2)
    assert q.take_used() == [(runt, 0), (down, 0)]
    assert device.stats()["tx_dropped"] == 2 and device.stats()["tx_packets"] == 0
    assert not host_readable(wire[1])


def test_tx_eagain_drops_and_counts(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(TX)
    sent = 0
    while device.stats()["tx_dropped"] == 0:  # fill the socket until the back-end says EAGAIN
        q.add([net_hdr() + frame(4000)], [])
        device.notify(TX)
        sent += 1
        wait_for(lambda: q.used_idx() == sent & 0xFFFF)
        q.take_used()
        assert sent < 10000
    assert device.stats()["tx_packets"] == sent - 1


# --- receive ---------------------------------------------------------------------------------------------

def test_rx_into_a_single_buffer_sets_num_buffers(memory, iothread, wire):
    device, driver = make(memory, iothread, wire, features_off=VIRTIO_NET_F_MRG_RXBUF)
    q = driver.queue(RX)
    head = q.add([], [HDR + 1514])
    payload = frame(64, seed=7)
    wire[1].send(net_hdr(flags=2, num_buffers=0xEEEE) + payload)
    wait_for(lambda: q.used_idx() == 1)
    [(used_head, length)] = q.take_used()
    assert (used_head, length) == (head, HDR + 64)
    data = q.written(head)[:length]
    assert data == net_hdr(flags=2, num_buffers=1) + payload
    assert device.stats()["rx_packets"] == 1 and device.stats()["rx_bytes"] == 64


def test_rx_header_split_over_descriptors(memory, iothread, wire):
    device, driver = make(memory, iothread, wire, features_off=VIRTIO_NET_F_MRG_RXBUF)
    q = driver.queue(RX)
    head = q.add([], [11, 30, 100])  # num_buffers straddles the first two descriptors
    payload = frame(50, seed=3)
    wire[1].send(net_hdr(num_buffers=0xEEEE) + payload)
    wait_for(lambda: q.used_idx() == 1)
    assert q.take_used() == [(head, HDR + 50)]
    assert q.written(head)[:HDR + 50] == net_hdr(num_buffers=1) + payload


def test_rx_into_merged_buffers_sets_num_buffers(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    assert device.acked_features & VIRTIO_NET_F_MRG_RXBUF
    q = driver.queue(RX)
    heads = [q.add([], [64]) for _ in range(4)]
    device.notify(RX)
    payload = frame(150, seed=9)
    wire[1].send(net_hdr(num_buffers=0xEEEE) + payload)
    wait_for(lambda: q.used_idx() == 3)
    used = q.take_used()
    assert used == [(heads[0], 64), (heads[1], 64), (heads[2], 34)]
    data = b"".join(q.written(h)[:n] for h, n in used)
    assert data == net_hdr(num_buffers=3) + payload
    # a small frame then takes exactly one buffer
    wire[1].send(net_hdr() + frame(20))
    wait_for(lambda: q.used_idx() == 4)
    assert q.take_used() == [(heads[3], HDR + 20)]
    assert q.written(heads[3])[:HDR] == net_hdr(num_buffers=1)
    assert device.stats()["rx_packets"] == 2


def test_a_largest_frame_fills_page_sized_buffers_and_leaves_the_rest_in_order(memory, iothread, wire):
    """A TSO-sized frame (as a TAP with offloads delivers) into 4 KiB mergeable buffers, as Linux
    posts them: one readv fills as many as it needs; the buffers it did not need take the next
    frames, in the order the guest posted them."""
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    heads = [q.add([], [4096]) for _ in range(15)]
    device.notify(RX)
    big = frame(40000, seed=5)
    wire[1].send(net_hdr(gso_type=1, gso_size=1448, num_buffers=0xEEEE) + big)
    needed = -(-(HDR + len(big)) // 4096)
    wait_for(lambda: q.used_idx() == needed)
    used = q.take_used()
    assert [h for h, _ in used] == heads[:needed]
    assert [n for _, n in used] == [4096] * (needed - 1) + [(HDR + len(big)) - 4096 * (needed - 1)]
    assert b"".join(q.written(h)[:n] for h, n in used) == net_hdr(gso_type=1, gso_size=1448, num_buffers=needed) + big
    for seed in range(2):
        wire[1].send(net_hdr() + frame(60, seed=seed))
    wait_for(lambda: q.used_idx() == needed + 2)
    assert q.take_used() == [(heads[needed], HDR + 60), (heads[needed + 1], HDR + 60)]
    assert q.written(heads[needed + 1])[:HDR + 60] == net_hdr(num_buffers=1) + frame(60, seed=1)
    assert device.stats()["rx_packets"] == 3 and device.stats()["rx_dropped"] == 0


@pytest.mark.io_thread_receive
def test_guest_ram_closes_while_the_device_holds_buffers_for_the_next_frame(iothread, wire):
    """The device keeps views of the buffers it holds from one frame to the next; RAM must still
    close (a view of a mapping keeps it from closing) and the device must not use them after."""
    memory = GuestMemory.from_specs([RegionSpec(0, 4 << 20)])
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    heads = [q.add([], [4096]) for _ in range(4)]
    device.notify(RX)
    wire[1].send(net_hdr() + frame(100))
    wait_for(lambda: q.used_idx() == 1)
    assert q.take_used() == [(heads[0], HDR + 100)]
    with device.lock:
        assert device._rx_views  # the three buffers left, ready for the next frame
    memory.close()
    with device.lock:
        assert not device._rx_views


def test_merged_frame_waits_for_more_buffers(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    first = q.add([], [64])
    device.notify(RX)
    payload = frame(100, seed=1)
    wire[1].send(net_hdr() + payload)
    wait_for(lambda: not device.rx_watching)  # one buffer is not enough: the device waits for a kick
    assert q.used_idx() == 0
    second = q.add([], [64])
    device.notify(RX)
    wait_for(lambda: q.used_idx() == 2)
    used = q.take_used()
    assert used == [(first, 64), (second, HDR + 100 - 64)]
    assert b"".join(q.written(h)[:n] for h, n in used) == net_hdr(num_buffers=2) + payload


def test_rx_without_guest_buffers_stops_watching_and_resumes_on_kick(memory, iothread, wire):
    device, driver = make(memory, iothread, wire, activate=False)
    wakeups = []
    original = device._rx_ready
    device._rx_ready = lambda *args, **kwargs: (wakeups.append(1), original(*args, **kwargs))
    device.activate()
    wire[1].send(net_hdr() + frame(40))
    wait_for(lambda: wakeups and not device.rx_watching)
    seen = len(wakeups)
    time.sleep(0.1)
    assert len(wakeups) == seen <= 2  # no busy loop on the readable fd
    assert host_readable(wire[0], 0)  # the frame waits in the back-end
    q = driver.queue(RX)
    head = q.add([], [HDR + 1514])
    device.notify(RX)
    wait_for(lambda: q.used_idx() == 1)
    assert q.take_used() == [(head, HDR + 40)]
    wait_for(lambda: not device.rx_watching)  # that was the only buffer again


def test_oversize_frame_is_dropped_and_counted(memory, iothread, wire):
    device, driver = make(memory, iothread, wire, features_off=VIRTIO_NET_F_MRG_RXBUF)
    q = driver.queue(RX)
    head = q.add([], [HDR + 100])
    device.notify(RX)
    wire[1].send(net_hdr() + frame(200))
    wire[1].send(net_hdr() + frame(50, seed=5))
    wait_for(lambda: q.used_idx() == 1)
    assert q.take_used() == [(head, HDR + 50)]  # the same buffer took the next frame
    assert q.written(head)[HDR:HDR + 50] == frame(50, seed=5)
    assert device.stats()["rx_dropped"] == 1 and device.stats()["rx_packets"] == 1


def test_rx_buffer_too_small_for_the_header_is_returned_empty(memory, iothread, wire):
    device, driver = make(memory, iothread, wire, features_off=VIRTIO_NET_F_MRG_RXBUF)
    q = driver.queue(RX)
    tiny, good = q.add([], [HDR - 1]), q.add([], [2048])
    device.notify(RX)
    wire[1].send(net_hdr() + frame(30))
    wait_for(lambda: q.used_idx() == 2)
    assert q.take_used() == [(tiny, 0), (good, HDR + 30)]


def test_rx_while_the_link_is_down_is_dropped_and_counted(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    q = driver.queue(RX)
    head = q.add([], [2048])
    device.notify(RX)
    device.set_link(False)
    wire[1].send(net_hdr() + frame(30))
    wait_for(lambda: device.stats()["rx_dropped"] == 1)
    device.set_link(True)
    wire[1].send(net_hdr() + frame(31))
    wait_for(lambda: q.used_idx() == 1)
    assert q.take_used() == [(head, HDR + 31)]


def test_reset_stops_rx_watching(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    driver.queue(RX).add([], [2048])
    device.notify(RX)
    assert device.rx_watching or device._lent_rx_thread() is not None  # (the I/O thread may lend it at once)
    device.reset()
    assert not device.rx_watching and device._lent_rx_thread() is None
    wire[1].send(net_hdr() + frame(30))
    time.sleep(0.1)
    assert host_readable(wire[0], 0)  # nobody read it
    assert device.stats()["rx_packets"] == 0


@pytest.mark.io_thread_receive
def test_save_and_restore_keep_buffers_the_device_had_taken(memory, iothread, wire):
    device, driver = make(memory, iothread, wire, features_off=VIRTIO_F_EVENT_IDX)
    q = driver.queue(RX)
    a, b = q.add([], [2048]), q.add([], [2048])
    device.notify(RX)
    wire[1].send(net_hdr() + frame(30))
    wait_for(lambda: q.used_idx() == 1)
    wait_for(lambda: device.queues[RX].last_avail == 2)  # b is popped and held after EAGAIN
    device.set_link(False)
    state = through_json(device.save())
    assert state.virtio.queues[RX].in_flight == (b,) and state.virtio.queues[RX].last_avail == 2
    device.reset()

    other_device, other_host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with other_device, other_host:
        restored = VirtioNet(FdBackend(other_device.fileno()), mac=b"\x02" * 6, iothread=iothread, queue_size=16)
        restored.attach(memory, driver.interrupts)
        restored.restore(state)
        assert restored.save() == state
        assert restored.mac == MAC and not restored.link_up
        restored.set_link(True)
        assert restored.rx_watching
        other_host.send(net_hdr() + frame(40, seed=2))
        wait_for(lambda: q.used_idx() == 2)
        assert q.take_used() == [(a, HDR + 30), (b, HDR + 40)]
        assert restored.stats()["rx_packets"] == 2
        restored.reset()


def test_restore_refuses_a_bad_state_and_changes_nothing(memory, iothread, wire):
    device, driver = make(memory, iothread, wire)
    state = device.save()
    fresh = VirtioNet(FdBackend(wire[0].fileno()), mac=b"\x02" * 6, iothread=iothread, queue_size=16)
    before = fresh.save()
    with pytest.raises(StateError, match="counters: names"):
        fresh.restore(changed(state, counters={"rx_packets": 1}))
    with pytest.raises(StateError, match="mac: 01:00:00:00:00:00 is not a 6-byte unicast"):
        changed(state, mac=b"\x01" + bytes(5))
    with pytest.raises(StateError, match="queues: 1 queues, this virtio-net has 2"):
        fresh.restore(changed(state, virtio=changed(state.virtio, queues=state.virtio.queues[:1])))
    assert fresh.save() == before
