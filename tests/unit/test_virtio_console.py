"""virtio-console: hvc0 output and input, the MULTIPORT control protocol, Unix-socket ports."""

import os
import socket
import struct
import tempfile
import time

import pytest

from helpers.state import changed, through_json
from pyvmm.persist import StateError

from helpers.virtio_driver import FakeDriver
from pyvmm.devices.virtio.console import (
    CONSOLE_PORT, CONTROL, DEVICE_READY, PENDING_LIMIT, PORT_ADD, PORT_NAME, PORT_OPEN, PORT_READY,
    VIRTIO_CONSOLE_F_EMERG_WRITE, VirtioConsole,
)
from pyvmm.devices.virtio.device import VIRTIO_F_VERSION_1
from pyvmm.errors import user_error_message
from pyvmm.host import UnixPortListener
from pyvmm.iothread import IoThread
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

CTRL_RX, CTRL_TX = 2, 3
PORT1_RX, PORT1_TX = 4, 5


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, 4 << 20)]) as mem:
        yield mem


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)


class Guest:
    """The guest side of a console: a fake driver plus control-message helpers."""

    def __init__(self, memory, device, **kw):
        self.device = device
        self.driver = FakeDriver(memory, device, queue_size=8, **kw)
        self.control_log: list[tuple[int, int, int, bytes]] = []

    def q(self, index):
        return self.driver.queue(index)

    def post_control_buffers(self, count=8):
        for _ in range(count):
            self.q(CTRL_RX).add([], [64])
        self.device.notify(CTRL_RX)

    def send_control(self, port_id, event, value):
        self.q(CTRL_TX).add([CONTROL.pack(port_id, event, value)], [])
        self.device.notify(CTRL_TX)

    def control(self):
        """Control messages the device sent since the last call: (id, event, value, payload)."""
        out = []
        q = self.q(CTRL_RX)
        for head, written in q.take_used():
            data = q.written(head)[:written]
            out.append((*CONTROL.unpack(data[:8]), data[8:]))
            q.add([], [64])  # give the buffer back, as Linux does
        self.device.notify(CTRL_RX)
        self.control_log += out
        return out

    def post_rx(self, queue_index, count=4, size=32):
        heads = [self.q(queue_index).add([], [size]) for _ in range(count)]
        self.device.notify(queue_index)
        return heads

    def received(self, queue_index):
        q = self.q(queue_index)
        return b"".join(q.written(head)[:n] for head, n in q.take_used())

    def transmit(self, queue_index, data):
        self.q(queue_index).add([data], [])
        self.device.notify(queue_index)

    def handshake(self):
        self.post_control_buffers()
        self.send_control(0xFFFFFFFF, DEVICE_READY, 1)
        for port in self.device.ports:
            self.send_control(port.id, PORT_READY, 1)
        return self.control()


@pytest.fixture
def idle_io():
    """An I/O thread that never starts: registrations happen inline, nothing is served."""
    thread = IoThread(name="test-idle")
    yield thread
    thread.stop()


def make_console(sink, iothread, *, ports=None, **kw):
    """The device with a Unix-socket host end for each named port (name -> socket path)."""
    listeners = {name: UnixPortListener(path, iothread) for name, path in (ports or {}).items()}
    return VirtioConsole(sink.append, ports=listeners, **kw)


class NoListener:
    def start_accepting(self, on_client):
        pass

    def stop_accepting(self):
        pass

    def close(self):
        pass


def test_hvc0_output_reaches_console_write(memory, idle_io):
    out = []
    device = make_console(out, idle_io)
    guest = Guest(memory, device)
    guest.transmit(1, b"hello, ")
    guest.transmit(1, b"world\n")
    assert b"".join(out) == b"hello, world\n"
    assert [n for _, n in guest.q(1).take_used()] == [0, 0]
    assert device.counters()["ports"]["console"]["tx_bytes"] == 13


def test_config_space_and_features(memory, idle_io):
    device = make_console([], idle_io, cols=80, rows=25)
    assert struct.unpack("<HHI", device.read_config(0, 8)) == (80, 25, 1)
    assert device.offered_features & 0b111 == 0b111  # SIZE, MULTIPORT, EMERG_WRITE


def test_emergency_write(memory, idle_io):
    out = []
    device = make_console(out, idle_io)
    Guest(memory, device)
    assert device.has_feature(VIRTIO_CONSOLE_F_EMERG_WRITE)
    device.write_config(8, struct.pack("<I", ord("!")))
    assert out == [b"!"]


def test_control_handshake(memory, idle_io):
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        device = make_console([], idle_io, ports={"org.pyvmm.agent": os.path.join(tmp, "agent.sock")})
        try:
            guest = Guest(memory, device)
            guest.post_control_buffers()
            guest.send_control(0xFFFFFFFF, DEVICE_READY, 1)
            assert guest.control() == [(0, PORT_ADD, 1, b""), (1, PORT_ADD, 1, b"")]
            guest.send_control(0, PORT_READY, 1)
            assert guest.control() == [(0, CONSOLE_PORT, 1, b""), (0, PORT_OPEN, 1, b"")]
            guest.send_control(1, PORT_READY, 1)
            # a named port, no client yet: the guest is not told it is open
            assert guest.control() == [(1, PORT_NAME, 1, b"org.pyvmm.agent")]
            assert struct.unpack("<HHI", device.read_config(0, 8))[2] == 2
        finally:
            device.close()
        assert not os.path.exists(os.path.join(tmp, "agent.sock"))


def test_console_input_waits_for_the_port_to_open_and_for_buffers(memory, idle_io):
    device = make_console([], idle_io)
    guest = Guest(memory, device)
    guest.handshake()
    assert device.console_input(b"ls\n") == 3
    guest.post_rx(0)
    assert guest.received(0) == b""           # hvc has not opened port 0 yet
    guest.send_control(0, PORT_OPEN, 1)
    assert guest.received(0) == b"ls\n"
    device.console_input(b"x" * 100)          # 4 buffers of 32 left: 96 bytes go now, 4 wait
    assert guest.received(0) == b"x" * 96
    assert device.rx_space() == PENDING_LIMIT - 4
    guest.post_rx(0, count=1)
    assert guest.received(0) == b"xxxx"


def test_console_input_without_multiport_and_its_bound(memory, idle_io):
    device = make_console([], idle_io)
    guest = Guest(memory, device, features=VIRTIO_F_VERSION_1)
    assert device.console_input(b"a" * (PENDING_LIMIT + 10)) == PENDING_LIMIT
    assert device.counters()["ports"]["console"]["rx_dropped"] == 10
    assert device.rx_space() == 0 and device.wait_rx_space(0.01) == 0
    guest.post_rx(0, count=2, size=4096)
    assert guest.received(0) == b"a" * 8192
    assert device.wait_rx_space(0) == 8192


def test_malformed_control_messages_are_ignored(memory, idle_io):
    device = make_console([], idle_io)
    guest = Guest(memory, device)
    guest.post_control_buffers()
    guest.q(CTRL_TX).add([b"\x01\x02"], [])     # short
    guest.send_control(7, PORT_READY, 1)         # no such port
    guest.send_control(0, 99, 1)                 # no such event
    device.notify(CTRL_TX)
    assert not device.broken and device.control_malformed == 3
    assert guest.control() == []


@pytest.fixture
def socket_console(memory, sockdir, iothread):
    path = os.path.join(sockdir, "port1")
    device = make_console([], iothread, ports={"org.test.port": path})
    guest = Guest(memory, device)
    yield device, guest, path
    device.close()


def connect(path):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    return client


def test_socket_port_relays_both_ways(socket_console):
    device, guest, path = socket_console
    assert guest.handshake()[-1] == (1, PORT_NAME, 1, b"org.test.port")
    with connect(path) as client:
        wait_for(lambda: (1, PORT_OPEN, 1, b"") in guest.control())
        client.sendall(b"early")                 # the guest has not opened /dev/vport0p1 yet: held
        wait_for(lambda: device.ports[1].pending == b"early")
        guest.post_rx(PORT1_RX)
        guest.send_control(1, PORT_OPEN, 1)
        assert guest.received(PORT1_RX) == b"early"
        client.sendall(b"ping")
        got = b""
        deadline = time.monotonic() + 5
        while got != b"ping" and time.monotonic() < deadline:
            got += guest.received(PORT1_RX)
        assert got == b"ping"
        guest.transmit(PORT1_TX, b"pong")
        assert client.recv(16) == b"pong"
    wait_for(lambda: (1, PORT_OPEN, 0, b"") in guest.control())
    counters = device.counters()["ports"]["org.test.port"]
    assert counters["rx_bytes"] == 9 and counters["tx_bytes"] == 4 and counters["connections"] == 1


def test_one_client_at_a_time_and_the_next_is_accepted(socket_console):
    device, guest, path = socket_console
    guest.handshake()
    first = connect(path)
    wait_for(lambda: device.ports[1].client is not None)
    second = connect(path)                        # waits in the backlog
    guest.control()
    guest.send_control(1, PORT_OPEN, 1)
    guest.transmit(PORT1_TX, b"to-first")
    assert first.recv(16) == b"to-first"
    first.close()
    wait_for(lambda: device.ports[1].connections == 2)
    guest.transmit(PORT1_TX, b"to-second")
    assert second.recv(16) == b"to-second"
    guest.control()
    events = [(i, e, v) for i, e, v, _ in guest.control_log if e == PORT_OPEN and i == 1]
    assert events == [(1, PORT_OPEN, 1), (1, PORT_OPEN, 0), (1, PORT_OPEN, 1)]
    second.close()


def test_guest_output_without_a_client_is_dropped(socket_console):
    device, guest, _ = socket_console
    guest.handshake()
    guest.transmit(PORT1_TX, b"nobody")
    assert device.counters()["ports"]["org.test.port"]["tx_dropped"] == 6


def test_a_fast_client_is_held_back_not_dropped(socket_console):
    device, guest, path = socket_console
    guest.handshake()
    guest.send_control(1, PORT_OPEN, 1)
    blob = bytes(range(256)) * 1024              # 256 KiB, four times the port's buffer
    q = guest.q(PORT1_RX)
    with connect(path) as client:
        client.setblocking(False)
        sent, outstanding, got = 0, 0, bytearray()
        deadline = time.monotonic() + 20
        while len(got) < len(blob):
            assert time.monotonic() < deadline
            if sent < len(blob):
                try:
                    sent += client.send(blob[sent:sent + 65536])
                except BlockingIOError:
                    pass
            assert len(device.ports[1].pending) <= PENDING_LIMIT
            if outstanding == 0:                 # at most a ring's worth of buffers in flight
                guest.post_rx(PORT1_RX, count=8, size=4096)
                outstanding = 8
            for head, n in q.take_used():
                got += q.written(head)[:n]
                outstanding -= 1
        assert bytes(got) == blob
    assert device.ports[1].rx_dropped == 0


def test_a_slow_client_holds_the_guest_back(socket_console):
    device, guest, path = socket_console
    guest.handshake()
    q = guest.q(PORT1_TX)
    with connect(path) as client:
        wait_for(lambda: device.ports[1].client is not None)
        chunks, outstanding = [], 0
        while outstanding < 8:                    # write until the device stops taking chains
            assert len(chunks) < 64
            chunk = bytes([len(chunks)]) * 32768
            chunks.append(chunk)
            guest.transmit(PORT1_TX, chunk)
            outstanding += 1 - len(q.take_used())
        assert len(device.ports[1].output) >= 32768
        expected = b"".join(chunks)
        got = bytearray()
        while len(got) < len(expected):           # the client catches up; the held chains follow
            got += client.recv(1 << 20)
        assert bytes(got) == expected
    assert device.ports[1].tx_dropped == 0


def test_save_restore_keeps_pending_bytes_and_reports_the_lost_client(socket_console, memory, iothread):
    device, guest, path = socket_console
    guest.handshake()
    with connect(path) as client:
        wait_for(lambda: (1, PORT_OPEN, 1, b"") in guest.control())
        client.sendall(b"kept")
        wait_for(lambda: device.ports[1].pending == b"kept")
        device.console_input(b"typed")
        state = through_json(device.save())
        device.close()                            # the old device leaves the guest's rings alone from here
    clone = make_console([], iothread, ports={"org.test.port": path + "-new"})
    try:
        clone.attach(memory, guest.driver.interrupts)
        guest.device = clone
        clone.restore(state)
        assert clone.ports[1].pending == b"kept" and clone.ports[0].pending == b"typed"
        assert (1, PORT_OPEN, 0, b"") in guest.control()   # the client did not survive the snapshot
        guest.post_rx(0)
        guest.send_control(0, PORT_OPEN, 1)
        assert guest.received(0) == b"typed"
    finally:
        clone.close()


def test_restore_refuses_other_ports(memory, idle_io):
    device = make_console([], idle_io)
    state = device.save()
    with pytest.raises(StateError, match="ports: port 0 .* comes first"):
        changed(state, ports=())
    other = make_console([], idle_io, ports={"a": os.path.join(tempfile.mkdtemp(), "a")})
    try:
        with pytest.raises(StateError, match=r"ports: named \[None\], this device has \[None, 'a'\]"):
            other.restore(state)
        other.restore(through_json(other.save()))
    finally:
        other.close()


def test_stale_socket_is_replaced_and_a_regular_file_is_refused(sockdir, idle_io):
    stale = os.path.join(sockdir, "stale")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(stale)
    device = make_console([], idle_io, ports={"a": stale})
    device.close()
    regular = os.path.join(sockdir, "file")
    open(regular, "w").close()
    with pytest.raises(OSError) as info:
        make_console([], idle_io, ports={"a": regular})
    assert user_error_message(info.value) == f"{regular}: cannot listen here: Address already in use"


@pytest.mark.parametrize("name", ["", "a/b", "tab\there", "x" * 300])
def test_bad_port_names_are_refused(name, idle_io):
    with pytest.raises(ValueError, match="bad port name"):
        VirtioConsole([].append, ports={name: NoListener()})


def test_input_into_a_broken_ring_marks_the_device_not_the_caller(memory, idle_io):
    device = make_console([], idle_io)
    guest = Guest(memory, device, features=VIRTIO_F_VERSION_1)
    guest.q(0).set_avail_idx(99)                 # 99 new entries on a ring of 8
    device.console_input(b"x")
    assert device.broken and guest.driver.interrupts.needs_reset
