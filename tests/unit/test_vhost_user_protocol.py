"""vhost-user: message encoding, fd passing, the front-end's requests against a scripted back-end,
reply timeouts and disconnects, and VhostUserBlk's control path (no real back-end needed)."""

import logging
import mmap
import os
import select
import socket
import struct
import threading
import time

import pytest

from helpers.state import changed, through_json
from pyvmm.persist import StateError

from helpers.vhost_user_backend import FakeBackend
from helpers.virtio_driver import FakeDriver, Interrupts
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.vhost_user_blk import (
    CONFIG_NUM_QUEUES, CONFIG_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VhostUserBlk,
)
from pyvmm.errors import UserError
from pyvmm.iothread import make_eventfd
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.vhost_user import (
    ProtocolFeature, Request, VhostUserDisconnected, VhostUserError, VhostUserFrontend, VhostUserProtocolError,
    VhostUserTimeout,
)
from pyvmm.vhost_user.protocol import (
    FLAG_NEED_REPLY, FLAG_REPLY, HEADER, VERSION, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES,
    MemoryTableEntry, Message, close_fds, decode_config, decode_memory_table, decode_vring_addr,
    decode_vring_state, encode_config, encode_memory_table, encode_vring_addr, encode_vring_file,
    recv_message, send_message,
)

REPLY_ACK = ProtocolFeature.REPLY_ACK.mask
CONFIG = ProtocolFeature.CONFIG.mask
MQ = ProtocolFeature.MQ.mask


# --- encoding ------------------------------------------------------------------------------------


def test_payload_layouts_match_the_spec():
    assert HEADER.size == 12
    addr = encode_vring_addr(2, desc=0x1000, used=0x3000, avail=0x2000, flags=1, log=0x99)
    assert len(addr) == 40
    assert struct.unpack("=IIQQQQ", addr) == (2, 1, 0x1000, 0x3000, 0x2000, 0x99)
    assert decode_vring_addr(addr)["avail"] == 0x2000
    table, fds = encode_memory_table([MemoryTableEntry(0, 0x1000, 0x7f00_0000_0000, 5),
                                      MemoryTableEntry(0x10_0000, 0x2000, 0x7f00_1000_0000, 6, mmap_offset=0)])
    assert len(table) == 8 + 2 * 32 and fds == [5, 6]
    assert decode_memory_table(table) == [(0, 0x1000, 0x7f00_0000_0000, 0), (0x10_0000, 0x2000, 0x7f00_1000_0000, 0)]
    assert encode_vring_file(3, True) == struct.pack("=Q", 3)
    assert encode_vring_file(3, False) == struct.pack("=Q", 3 | 1 << 8)  # bit 8: no fd, poll
    config = encode_config(4, 2, 0, b"\x01\x02")
    assert len(config) == 12 + 2 and decode_config(config) == (4, 2, 0, b"\x01\x02")
    assert encode_config(0, 3) == struct.pack("=III", 0, 3, 0) + bytes(3)  # GET_CONFIG: room for the answer


def test_memory_table_limits():
    with pytest.raises(VhostUserError, match="at most 8"):
        encode_memory_table([MemoryTableEntry(i << 20, 4096, i << 30, 3) for i in range(9)])
    with pytest.raises(VhostUserError):
        encode_memory_table([])
    with pytest.raises(ValueError):
        encode_vring_file(256, True)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_fds_travel_with_the_header(pair):
    a, b = pair
    events = [make_eventfd(), make_eventfd()]
    try:
        send_message(a, Message(Request.SET_VRING_KICK, VERSION, encode_vring_file(1, True), events))
        message = recv_message(b)
        assert (message.request, message.flags, message.payload) == (Request.SET_VRING_KICK, VERSION,
                                                                      encode_vring_file(1, True))
        assert len(message.fds) == 2 and not set(message.fds) & set(events)
        os.eventfd_write(message.fds[1], 7)  # the received fd is the same eventfd
        assert os.eventfd_read(events[1]) == 7
        close_fds(message.fds)
    finally:
        close_fds(events)


def test_message_split_across_reads_is_reassembled(pair):
    a, b = pair
    data = HEADER.pack(Request.GET_FEATURES, VERSION | FLAG_REPLY, 8) + struct.pack("=Q", 0xABC)
    received = []
    reader = threading.Thread(target=lambda: received.append(recv_message(b)))
    reader.start()
    for i in range(len(data)):  # byte by byte
        a.send(data[i:i + 1])
        time.sleep(0.001)
    reader.join(5)
    assert received[0].payload == struct.pack("=Q", 0xABC) and received[0].is_reply


def test_oversized_payload_and_eof_are_errors(pair):
    a, b = pair
    a.sendall(HEADER.pack(Request.GET_CONFIG, VERSION | FLAG_REPLY, 1 << 20))
    with pytest.raises(VhostUserProtocolError, match="1048576-byte payload"):
        recv_message(b)
    a.close()
    with pytest.raises(VhostUserDisconnected):
        recv_message(b)


# --- the front-end against a scripted back-end ---------------------------------------------------------------


@pytest.fixture
def make_backend(tmp_path):
    backends = []

    def make(**kw):
        backend = FakeBackend(tmp_path / f"vu{len(backends)}.sock", **kw)
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


def test_connect_errors_are_one_line(tmp_path):
    with pytest.raises(VhostUserError, match="does not exist") as missing:
        VhostUserFrontend.connect(tmp_path / "nothing.sock")
    assert "\n" not in str(missing.value) and isinstance(missing.value, UserError)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))  # bound, never listening: a back-end that died
    try:
        with pytest.raises(VhostUserError, match="refused the connection"):
            VhostUserFrontend.connect(tmp_path / "stale.sock")
    finally:
        stale.close()


def test_negotiation_enables_common_protocol_features_then_acks_every_request(make_backend):
    backend = make_backend(protocol_features=REPLY_ACK | CONFIG | ProtocolFeature.INFLIGHT_SHMFD.mask)
    frontend = VhostUserFrontend.connect(backend.path)
    frontend.negotiate(REPLY_ACK | CONFIG | MQ)
    assert frontend.protocol_features == REPLY_ACK | CONFIG
    assert backend.acked_protocol_features == REPLY_ACK | CONFIG
    frontend.set_vring_num(0, 64)
    assert backend.names() == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER",
                               "SET_VRING_NUM"]
    flags = {Request(code).name: f for code, f, _, _ in backend.requests}
    assert not flags["SET_PROTOCOL_FEATURES"] & FLAG_NEED_REPLY  # REPLY_ACK was not on yet
    assert flags["SET_OWNER"] & FLAG_NEED_REPLY and flags["SET_VRING_NUM"] & FLAG_NEED_REPLY
    assert not flags["GET_FEATURES"] & FLAG_NEED_REPLY  # it has its own reply
    frontend.close()


def test_backend_without_protocol_features_gets_plain_requests(make_backend):
    backend = make_backend(features=VIRTIO_F_VERSION_1)
    frontend = VhostUserFrontend.connect(backend.path)
    frontend.negotiate(REPLY_ACK)
    assert frontend.protocol_features == 0
    frontend.set_vring_base(0, 5)
    assert frontend.get_features() == VIRTIO_F_VERSION_1  # a barrier: everything before was read
    assert backend.names() == ["GET_FEATURES", "SET_OWNER", "SET_VRING_BASE", "GET_FEATURES"]
    assert decode_vring_state(backend.payloads(Request.SET_VRING_BASE)[0]) == (0, 5)
    with pytest.raises(VhostUserError, match="no CONFIG feature"):
        frontend.get_config(0, 8)
    frontend.close()


def test_rejected_request_is_an_error_and_the_connection_survives(make_backend):
    backend = make_backend(protocol_features=REPLY_ACK, reject={Request.SET_VRING_ADDR: 1})
    frontend = VhostUserFrontend.connect(backend.path)
    frontend.negotiate(REPLY_ACK)
    with pytest.raises(VhostUserError, match="rejected SET_VRING_ADDR"):
        frontend.set_vring_addr(0, desc=0x1000, used=0x2000, avail=0x3000)
    assert frontend.dead is None
    assert frontend.get_vring_base(0) == 0
    frontend.close()


def test_mem_table_shares_guest_ram_with_the_backend(make_backend):
    backend = make_backend(protocol_features=REPLY_ACK)
    frontend = VhostUserFrontend.connect(backend.path)
    frontend.negotiate(REPLY_ACK)
    with GuestMemory.from_specs([RegionSpec(0, 1 << 20), RegionSpec(4 << 20, 1 << 20)]) as memory:
        memory.write((4 << 20) + 0x10, b"shared")
        frontend.set_mem_table([MemoryTableEntry(r.guest_base, r.size, r.host_address, r.fd) for r in memory.regions])
        regions = decode_memory_table(backend.payloads(Request.SET_MEM_TABLE)[0])
        assert regions == [(r.guest_base, r.size, r.host_address, 0) for r in memory.regions]
        fd = backend.fds[Request.SET_MEM_TABLE][1]
        with mmap.mmap(fd, 1 << 20) as theirs:  # what the back-end maps is our RAM
            assert theirs[0x10:0x16] == b"shared"
            theirs[0x20:0x24] = b"back"
        assert memory.read((4 << 20) + 0x20, 4) == b"back"
    frontend.close()


def test_get_config_and_its_refusal(make_backend):
    backend = make_backend(protocol_features=REPLY_ACK | CONFIG, config=bytes(range(16)))
    frontend = VhostUserFrontend.connect(backend.path)
    frontend.negotiate(REPLY_ACK | CONFIG)
    assert frontend.get_config(4, 4) == bytes([4, 5, 6, 7])
    with pytest.raises(VhostUserError, match="refused GET_CONFIG of 32 bytes"):
        frontend.get_config(0, 32)  # the back-end answers with an empty payload
    frontend.set_config(8, b"\x01")
    assert decode_config(backend.payloads(Request.SET_CONFIG)[0]) == (8, 1, 0, b"\x01")
    frontend.close()


def test_silent_backend_times_out_and_the_connection_is_dead_after(make_backend):
    backend = make_backend(silent={Request.GET_FEATURES})
    frontend = VhostUserFrontend.connect(backend.path, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(VhostUserTimeout, match="did not answer GET_FEATURES within 0.2 s"):
        frontend.get_features()
    assert time.monotonic() - start < 2
    with pytest.raises(VhostUserDisconnected, match="did not answer"):  # a late reply must not be misread
        frontend.get_queue_num()
    frontend.close()


def test_backend_hanging_up_mid_request(make_backend):
    backend = make_backend(hangup_on=Request.GET_VRING_BASE)
    frontend = VhostUserFrontend.connect(backend.path)
    frontend.negotiate()
    with pytest.raises(VhostUserDisconnected, match="closed the connection"):
        frontend.get_vring_base(0)
    with pytest.raises(VhostUserDisconnected):
        frontend.set_owner()
    frontend.close()


def test_check_connection_sees_a_hang_up_without_blocking(make_backend):
    backend = make_backend()
    frontend = VhostUserFrontend.connect(backend.path)
    frontend.negotiate()
    assert frontend.check_connection() is None
    backend.hang_up()
    select.select([frontend.fileno()], [], [], 5)
    assert frontend.check_connection() == "vhost-user back-end closed the connection"
    assert frontend.dead
    frontend.close()


def test_reply_to_the_wrong_request_is_a_protocol_error(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)

    def answer_wrongly():
        conn, _ = listener.accept()
        recv_message(conn)
        send_message(conn, Message(Request.GET_QUEUE_NUM, VERSION | FLAG_REPLY, struct.pack("=Q", 1)))
        conn.recv(1)
        conn.close()

    thread = threading.Thread(target=answer_wrongly, daemon=True)
    thread.start()
    frontend = VhostUserFrontend.connect(tmp_path / "s")
    with pytest.raises(VhostUserProtocolError, match="answered GET_FEATURES with GET_QUEUE_NUM"):
        frontend.get_features()
    assert frontend.dead
    frontend.close()
    thread.join(5)
    listener.close()


# --- VhostUserBlk's control path against the scripted back-end -------------------------------------------------

BLK_CONFIG = struct.pack("<QII", 2048, 0, 126) + bytes(CONFIG_SIZE - 16)
BACKEND_FEATURES = (VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VHOST_USER_F_PROTOCOL_FEATURES
                    | VHOST_F_LOG_ALL | 1 << 24 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_MQ | 1 << 40)


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, 1 << 20)]) as mem:
        yield mem


def blk_backend(make_backend, **kw):
    kw.setdefault("features", BACKEND_FEATURES)
    kw.setdefault("protocol_features", REPLY_ACK | CONFIG | MQ)
    kw.setdefault("config", BLK_CONFIG[:CONFIG_NUM_QUEUES] + struct.pack("<H", 4) + BLK_CONFIG[CONFIG_NUM_QUEUES + 2:])
    kw.setdefault("queue_num", 4)
    return make_backend(**kw)


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_blk_offers_only_what_the_guest_may_see(make_backend, iothread):
    backend = blk_backend(make_backend)
    device = VhostUserBlk(backend.path, iothread=iothread, num_queues=2)
    try:
        assert device.offered_features == (VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC
                                           | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_MQ)
        assert not device.offered_features & VHOST_USER_F_PROTOCOL_FEATURES
        config = device.config_bytes()
        assert len(config) == CONFIG_SIZE and struct.unpack_from("<Q", config)[0] == 2048
        assert struct.unpack_from("<H", config, CONFIG_NUM_QUEUES)[0] == 2  # ours, not the back-end's 4
        state = through_json(device.save())           # not started: the rings' positions are ours
        assert state.config == config and state.virtio.queues[0].last_avail == 0
        device.restore(state)
        assert device.save() == state
        other_disk = bytearray(config)
        other_disk[0] ^= 1
        with pytest.raises(StateError, match="config: describes another disk than the back-end"):
            device.restore(changed(state, config=bytes(other_disk)))
    finally:
        device.close()


@pytest.mark.parametrize("kw, message", [
    ({"protocol_features": REPLY_ACK}, "no CONFIG protocol feature"),
    ({"queue_num": 1}, "serves 1 queue"),
    ({"features": VHOST_USER_F_PROTOCOL_FEATURES}, "VIRTIO_F_VERSION_1"),
])
def test_blk_refuses_backends_it_cannot_use(make_backend, iothread, kw, message):
    backend = blk_backend(make_backend, **kw)
    with pytest.raises(VhostUserError, match=message):
        VhostUserBlk(backend.path, iothread=iothread, num_queues=2)


def test_blk_activation_hands_over_memory_and_rings(make_backend, iothread, memory):
    backend = blk_backend(make_backend)
    device = VhostUserBlk(backend.path, iothread=iothread, num_queues=2, queue_size=16)
    try:
        driver = FakeDriver(memory, device, features=device.offered_features & ~VIRTIO_BLK_F_RO)
        assert device.active and not device.broken
        names = backend.names()[names_start(backend):]
        assert names == ["SET_FEATURES", "SET_MEM_TABLE"] + 2 * [
            "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL", "SET_VRING_ERR",
            "SET_VRING_KICK"] + 2 * ["SET_VRING_ENABLE"]
        features = struct.unpack("=Q", backend.payloads(Request.SET_FEATURES)[0])[0]
        assert features == device.acked_features | VHOST_USER_F_PROTOCOL_FEATURES  # bit 30 on the channel only
        region = memory.regions[0]
        assert decode_memory_table(backend.payloads(Request.SET_MEM_TABLE)[0]) == [(0, 1 << 20, region.host_address, 0)]
        addr = decode_vring_addr(backend.payloads(Request.SET_VRING_ADDR)[1])
        queue = driver.queue(1)
        assert (addr["index"], addr["desc"], addr["avail"], addr["used"]) == (
            1, region.host_address + queue.desc_table, region.host_address + queue.avail_ring,
            region.host_address + queue.used_ring)
        assert decode_vring_state(backend.payloads(Request.SET_VRING_NUM)[0]) == (0, 16)

        kick = backend.fds[Request.SET_VRING_KICK][0]  # the last one sent: queue 1's
        device.notify(1)
        assert select.select([kick], [], [], 5)[0] and os.eventfd_read(kick) >= 1

        call = backend.fds[Request.SET_VRING_CALL][0]
        os.eventfd_write(call, 1)  # the back-end used buffers on queue 1
        assert wait_for(lambda: 1 in driver.interrupts.used)

        before = len(backend.requests)
        device.reset()
        assert [Request(r[0]).name for r in backend.requests[before:]] == \
            2 * ["SET_VRING_ENABLE"] + 2 * ["GET_VRING_BASE"]
        assert decode_vring_state(backend.payloads(Request.SET_VRING_ENABLE)[-1]) == (1, 0)
        assert not device.active
    finally:
        device.close()


def names_start(backend):
    """Index of the first request after the connection handshake (GET_CONFIG is its last)."""
    return backend.names().index("GET_CONFIG") + 1


class IrqfdInterrupts(Interrupts):
    """An interrupt object that, like an irqfd-backed MSI-X vector, takes the call eventfd itself."""

    def __init__(self):
        super().__init__()
        self.eventfds = [make_eventfd(), make_eventfd()]

    def queue_eventfd(self, index):
        return self.eventfds[index]


def test_blk_gives_the_backend_the_transports_irqfd(make_backend, iothread, memory):
    backend = blk_backend(make_backend)
    device = VhostUserBlk(backend.path, iothread=iothread, num_queues=1, queue_size=16)
    interrupts = IrqfdInterrupts()
    try:
        FakeDriver(memory, device, interrupts=interrupts)
        os.eventfd_write(backend.fds[Request.SET_VRING_CALL][0], 1)
        assert select.select([interrupts.eventfds[0]], [], [], 5)[0]  # straight to the vector
        time.sleep(0.05)
        assert interrupts.used == []  # pyvmm saw nothing
    finally:
        device.close()
        close_fds(interrupts.eventfds)


def test_blk_backend_disconnect_marks_the_device_needs_reset(make_backend, iothread, memory, caplog):
    backend = blk_backend(make_backend)
    device = VhostUserBlk(backend.path, iothread=iothread, queue_size=16)
    try:
        driver = FakeDriver(memory, device)
        with caplog.at_level(logging.WARNING):
            backend.hang_up()
            assert wait_for(lambda: driver.interrupts.needs_reset)
        assert device.broken == "vhost-user back-end closed the connection"
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(records) == 1 and records[0].exc_info is None
        assert "\n" not in records[0].getMessage()
        device.notify(0)  # ignored, no error
        device.reset()    # nothing to stop on a dead connection
        device.activate()
        assert device.broken == "vhost-user back-end closed the connection" and not device.active
    finally:
        device.close()


def test_blk_backend_error_fd_fails_the_device(make_backend, iothread, memory):
    backend = blk_backend(make_backend)
    device = VhostUserBlk(backend.path, iothread=iothread, queue_size=16)
    try:
        driver = FakeDriver(memory, device)
        os.eventfd_write(backend.fds[Request.SET_VRING_ERR][0], 1)
        assert wait_for(lambda: driver.interrupts.needs_reset)
        assert device.broken == "vhost-user back-end reported an error on queue 0"
    finally:
        device.close()


def test_blk_rejected_activation_fails_the_device(make_backend, iothread, memory):
    backend = blk_backend(make_backend, reject={Request.SET_MEM_TABLE: 1})
    device = VhostUserBlk(backend.path, iothread=iothread, queue_size=16)
    try:
        driver = FakeDriver(memory, device)
        assert driver.interrupts.needs_reset and "rejected SET_MEM_TABLE" in device.broken
    finally:
        device.close()


def test_blk_ring_outside_ram_is_refused_before_the_backend_sees_it(make_backend, iothread, memory):
    backend = blk_backend(make_backend)
    device = VhostUserBlk(backend.path, iothread=iothread, queue_size=16)
    try:
        driver = FakeDriver(memory, device, activate=False)
        device.queues[0].used_ring = (1 << 20) - 8
        device.activate()
        assert driver.interrupts.needs_reset and "outside guest RAM" in device.broken
        assert "SET_MEM_TABLE" not in backend.names()
    finally:
        device.close()
