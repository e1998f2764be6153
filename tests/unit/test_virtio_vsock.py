"""virtio-vsock: connections both ways over Unix sockets, credit, RST, hostile packets, restore."""

import os
import socket
import struct
import time

import pytest

from helpers.state import changed, through_json
from pyvmm.devices.virtio.vsock_state import ReplyState, VsockConnectionState
from pyvmm.persist import StateError
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers.virtio_driver import FakeDriver
from pyvmm.devices.virtio.vsock import (
    CONN_BUF_ALLOC, HEADER, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, VhostVsockUnavailable, VirtioVsock,
    require_vhost_vsock, vhost_vsock_available,
)
from pyvmm.errors import UserError
from pyvmm.host import VsockUnixHost
from pyvmm.iothread import IoThread
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

CID = 3
RX, TX, EVENT = 0, 1, 2


def make_vsock(cid, uds, iothread, **kw):
    return VirtioVsock(cid, VsockUnixHost(uds, iothread), **kw)


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, 8 << 20)]) as mem:
        yield mem


@pytest.fixture
def idle_io():
    thread = IoThread(name="test-idle")   # never started: registrations happen inline, nothing is served
    yield thread
    thread.stop()


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)
    return result


class Packet:
    def __init__(self, header: bytes, payload: bytes):
        (self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op, self.flags,
         self.buf_alloc, self.fwd_cnt) = HEADER.unpack(header)
        self.payload = payload

    def __repr__(self):
        return f"Packet(op={self.op}, {self.src_port}->{self.dst_port}, len={self.len}, flags={self.flags})"


class Guest:
    """The driver side: receive buffers laid out as Linux 6.1 does (header, then a page)."""

    def __init__(self, memory, device, rx_buffers=8):
        self.device = device
        self.driver = FakeDriver(memory, device, queue_size=16)
        self.rx_buffers = rx_buffers
        self.post_rx(rx_buffers)
        self.received: list[Packet] = []

    def post_rx(self, count, size=4096):
        for _ in range(count):
            self.driver.queue(RX).add([], [HEADER.size, size])
        self.device.notify(RX)

    def send(self, src_port, dst_port, op, payload=b"", *, flags=0, buf_alloc=65536, fwd_cnt=0, src_cid=CID,
             dst_cid=HOST_CID, kind=TYPE_STREAM, length=None):
        header = HEADER.pack(src_cid, dst_cid, src_port, dst_port, len(payload) if length is None else length,
                             kind, op, flags, buf_alloc, fwd_cnt)
        self.driver.queue(TX).add([header, payload] if payload else [header], [])
        self.device.notify(TX)

    def packets(self):
        """Packets the device put on the receive queue since the last call (buffers are given back)."""
        q = self.driver.queue(RX)
        out = []
        for head, written in q.take_used():
            data = q.written(head)[:written]
            packet = Packet(data[:HEADER.size], data[HEADER.size:])
            assert packet.len == len(packet.payload) and packet.type == TYPE_STREAM
            assert (packet.src_cid, packet.dst_cid) in ((HOST_CID, CID), (CID, CID)) or packet.op == OP_RST
            out.append(packet)
        if out:
            self.post_rx(len(out))
        self.received += out
        return out

    def wait_packet(self, op, timeout=5.0):
        def find():
            self.packets()
            for i, packet in enumerate(self.received):
                if packet.op == op:
                    return self.received.pop(i)
            return None
        return wait_for(find, timeout)


def host_server(path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(5)
    return server


@pytest.fixture
def vsock(memory, sockdir, iothread):
    uds = os.path.join(sockdir, "v.sock")
    device = make_vsock(CID, uds, iothread, queue_size=16)
    guest = Guest(memory, device)
    yield device, guest, uds
    device.close()


def test_config_holds_the_guest_cid(idle_io, sockdir):
    device = make_vsock(7, os.path.join(sockdir, "v"), idle_io)
    try:
        assert struct.unpack("<Q", device.read_config(0, 8))[0] == 0x7
    finally:
        device.close()
    assert not os.path.exists(os.path.join(sockdir, "v"))
    for cid in (0, 1, 2, 0xFFFFFFFF):
        host = VsockUnixHost(os.path.join(sockdir, "w"), idle_io)
        with pytest.raises(ValueError, match="reserved"):
            VirtioVsock(cid, host)
        host.close()


def test_guest_connects_to_a_host_unix_socket(vsock):
    device, guest, uds = vsock
    with host_server(f"{uds}_1234") as server:
        guest.send(5000, 1234, OP_REQUEST)
        response = guest.wait_packet(OP_RESPONSE)
        assert (response.src_cid, response.dst_cid, response.src_port, response.dst_port) == (HOST_CID, CID, 1234, 5000)
        assert response.buf_alloc == CONN_BUF_ALLOC
        peer, _ = server.accept()
        with peer:
            peer.settimeout(5)
            guest.send(5000, 1234, OP_RW, b"hello host")
            assert peer.recv(64) == b"hello host"
            peer.sendall(b"hello guest")
            data = guest.wait_packet(OP_RW)
            assert (data.src_port, data.dst_port, data.payload) == (1234, 5000, b"hello guest")
            assert data.fwd_cnt == 10         # the host took the guest's 10 bytes
            guest.send(5000, 1234, OP_SHUTDOWN, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
            assert guest.wait_packet(OP_RST).dst_port == 5000
            assert peer.recv(64) == b""       # the host end sees the close
    assert device.conns == {}


def test_guest_connect_to_nobody_is_reset(vsock):
    device, guest, _ = vsock
    guest.send(5000, 9, OP_REQUEST)
    rst = guest.wait_packet(OP_RST)
    assert (rst.src_port, rst.dst_port) == (9, 5000)
    assert device.counters()["connect_refused"] == 1


def test_host_connects_with_connect_line(vsock):
    device, guest, uds = vsock
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(uds)
        client.sendall(b"CONNECT 52\nearly")
        request = guest.wait_packet(OP_REQUEST)
        assert request.dst_port == 52 and request.src_port >= 1 << 30
        local = request.src_port
        guest.send(52, local, OP_RESPONSE, buf_alloc=65536)
        assert client.recv(64) == f"OK {local}\n".encode()
        data = guest.wait_packet(OP_RW)
        assert data.payload == b"early"      # sent right behind the CONNECT line
        guest.send(52, local, OP_RW, b"from guest")
        assert client.recv(64) == b"from guest"
        client.sendall(b"more")
        assert guest.wait_packet(OP_RW).payload == b"more"
        client.shutdown(socket.SHUT_WR)
        shutdown = guest.wait_packet(OP_SHUTDOWN)
        assert shutdown.flags == SHUTDOWN_SEND
        guest.send(52, local, OP_RW, b"reply after EOF")   # half-close: the guest may still answer
        assert client.recv(64) == b"reply after EOF"
        guest.send(52, local, OP_RST)
        assert client.recv(64) == b""
    wait_for(lambda: device.conns == {})


def test_host_connect_refused_by_the_guest(vsock):
    _, guest, uds = vsock
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(uds)
        client.sendall(b"CONNECT 7\n")
        request = guest.wait_packet(OP_REQUEST)
        guest.send(7, request.src_port, OP_RST)
        assert client.recv(64) == b""


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x\n", b"HELLO 5\n", b"CONNECT 99999999999\n", b"A" * 80])
def test_bad_connect_lines_close_the_client(vsock, line):
    device, guest, uds = vsock
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(uds)
        client.sendall(line)
        try:
            assert client.recv(64) == b""
        except ConnectionResetError:                        # closed with our extra bytes unread
            pass
    assert device.counters()["bad_connect_lines"] == 1
    assert [p for p in guest.packets() if p.op == OP_REQUEST] == []


def test_credit_limits_what_the_device_sends(vsock):
    device, guest, uds = vsock
    with host_server(f"{uds}_80") as server:
        guest.send(6000, 80, OP_REQUEST, buf_alloc=100)
        guest.wait_packet(OP_RESPONSE)
        peer, _ = server.accept()
        with peer:
            peer.sendall(bytes(range(250)))
            first = guest.wait_packet(OP_RW)
            assert guest.wait_packet(OP_CREDIT_REQUEST)   # out of credit: the device asks
            guest.packets()
            got = first.payload + b"".join(p.payload for p in guest.received if p.op == OP_RW)
            assert got == bytes(range(100))               # never more than buf_alloc in flight
            guest.received.clear()
            time.sleep(0.05)
            assert [p for p in guest.packets() if p.op == OP_RW] == []
            guest.send(6000, 80, OP_CREDIT_UPDATE, buf_alloc=100, fwd_cnt=60)  # the guest read 60
            more = guest.wait_packet(OP_RW)
            assert more.payload == bytes(range(100, 160))
            guest.send(6000, 80, OP_CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=160)
            rest = b""
            while len(rest) < 90:
                rest += guest.wait_packet(OP_RW).payload
            assert rest == bytes(range(160, 250))


def test_device_returns_credit_as_the_host_reads(vsock):
    _, guest, uds = vsock
    with host_server(f"{uds}_81") as server:
        guest.send(6001, 81, OP_REQUEST)
        guest.wait_packet(OP_RESPONSE)
        peer, _ = server.accept()
        with peer:
            chunk = b"z" * 32768
            sent = 0
            for _ in range(6):                              # 192 KiB: past half of what we advertise
                guest.send(6001, 81, OP_RW, chunk)
                sent += len(chunk)
            received = 0
            while received < sent:
                received += len(peer.recv(1 << 20))
            update = guest.wait_packet(OP_CREDIT_UPDATE)   # sent once the guest was past half its credit
            assert 0 < update.fwd_cnt <= sent and update.buf_alloc == CONN_BUF_ALLOC


def test_guest_ignoring_credit_is_reset(vsock):
    device, guest, uds = vsock
    with host_server(f"{uds}_82") as server:
        guest.send(6002, 82, OP_REQUEST)
        guest.wait_packet(OP_RESPONSE)
        peer, _ = server.accept()
        with peer:                                          # the host never reads
            for _ in range(32):
                guest.send(6002, 82, OP_RW, b"y" * 65536)
                if device.counters()["credit_violations"]:
                    break
            assert device.counters()["credit_violations"] == 1
            assert guest.wait_packet(OP_RST).dst_port == 6002
            assert device.conns == {}


def test_rst_for_unknown_connections(vsock):
    device, guest, _ = vsock
    guest.send(7000, 4242, OP_RW, b"who?")
    rst = guest.wait_packet(OP_RST)
    assert (rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port) == (HOST_CID, CID, 4242, 7000)
    guest.send(7000, 4242, OP_RST)                          # an RST is never answered
    guest.send(7000, 4242, OP_CREDIT_UPDATE)
    guest.wait_packet(OP_RST)
    time.sleep(0.02)
    assert guest.packets() == []


def test_malformed_packets_are_dropped_or_reset(vsock):
    device, guest, _ = vsock
    q = guest.driver.queue(TX)
    q.add([b"\x00" * 10], [])                              # short header: dropped
    device.notify(TX)
    guest.send(7001, 1, OP_REQUEST, src_cid=99)             # not from this guest: dropped
    assert guest.packets() == []
    guest.send(7002, 1, OP_RW, b"abc", length=1000)         # longer than the chain
    guest.send(7003, 1, OP_REQUEST, kind=2)                 # SEQPACKET was not negotiated
    guest.send(7004, 1, 99)                                 # no such op
    guest.send(7005, 1, OP_REQUEST, dst_cid=7)              # another CID: refused from that CID
    rsts = [guest.wait_packet(OP_RST) for _ in range(4)]
    assert sorted(p.dst_port for p in rsts) == [7002, 7003, 7004, 7005]
    assert [p.src_cid for p in rsts if p.dst_port == 7005] == [7]
    counters = device.counters()
    assert counters["malformed"] == 2 and counters["bad_src_cid"] == 1 and counters["refused"] == 3
    assert not device.broken


def test_a_device_rebuilt_in_this_process_keeps_its_connections(memory, sockdir, iothread):
    uds = os.path.join(sockdir, "v.sock")
    device = make_vsock(CID, uds, iothread, queue_size=16)
    clone = None
    try:
        guest = Guest(memory, device)
        with host_server(f"{uds}_90") as server:
            guest.send(8000, 90, OP_REQUEST)
            guest.wait_packet(OP_RESPONSE)
            peer, _ = server.accept()
            peer.settimeout(5)
            guest.send(8000, 90, OP_RW, b"ping")
            assert peer.recv(4) == b"ping"
            state = through_json(device.save())
            assert [(c.guest_port, c.host_port, c.state, c.rx_cnt) for c in state.connections] == \
                [(8000, 90, "established", 4)]
            host = device.detach_host()

            clone = VirtioVsock(CID, host, queue_size=16)
            clone.attach(memory, guest.driver.interrupts)
            guest.device = clone
            clone.restore(state)
            assert clone.save() == state
            peer.sendall(b"pong")                          # the host end never noticed
            data = guest.wait_packet(OP_RW)
            assert (data.src_port, data.dst_port, data.payload) == (90, 8000, b"pong")
            guest.send(8000, 90, OP_RW, b"again", fwd_cnt=4)
            assert peer.recv(5) == b"again"
            assert not [p for p in guest.received if p.op == OP_RST]
            peer.close()
    finally:
        device.close()                                     # after detach_host: leaves the streams alone
        if clone is not None:
            clone.close()


def test_restore_resets_connections_whose_host_end_is_gone(memory, sockdir, iothread):
    uds = os.path.join(sockdir, "v.sock")
    device = make_vsock(CID, uds, iothread, queue_size=16)
    guest = Guest(memory, device)
    with host_server(f"{uds}_90") as server:
        guest.send(8000, 90, OP_REQUEST)
        guest.wait_packet(OP_RESPONSE)
        peer, _ = server.accept()
        state = device.save()
        device.close()                                     # the host ends go with it
        peer.settimeout(5)
        assert peer.recv(8) == b""
        peer.close()
    fresh = make_vsock(CID, uds, iothread, queue_size=16)
    try:
        fresh.attach(memory, guest.driver.interrupts)
        guest.device = fresh
        fresh.restore(state)
        assert fresh.conns == {}
        rst = guest.wait_packet(OP_RST)                    # only that connection ends, cleanly
        assert (rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port) == (HOST_CID, 90, CID, 8000)
        assert fresh.counters()["rst_sent"] == 1
    finally:
        fresh.close()


def test_vsock_state_is_checked(memory, sockdir, idle_io):
    device = make_vsock(CID, os.path.join(sockdir, "v"), idle_io)
    try:
        state = device.save()
        with pytest.raises(StateError, match="guest_cid: 4, this device's is 3"):
            device.restore(changed(state, guest_cid=4))
        with pytest.raises(StateError, match=r"replies\[0\]: about connection \(1, 2\), which is not in the table"):
            changed(state, replies=(ReplyState(key=(1, 2), op=OP_RW, flags=0, raw=b""),))
        with pytest.raises(StateError, match="state: 'open' is not one of"):
            VsockConnectionState(guest_port=1, host_port=2, state="open", peer_buf_alloc=0, peer_fwd_cnt=0,
                                 tx_cnt=0, rx_cnt=0, fwd_cnt=0, last_fwd_sent=0, staged=b"", output=b"",
                                 host_eof=False, host_shut_wr=False, guest_shut_rcv=False, guest_shut_send=False,
                                 closing=False, credit_requested=False, update_queued=False)
    finally:
        device.close()


def test_host_data_into_a_broken_ring_marks_the_device_not_the_io_thread(vsock, iothread):
    device, guest, uds = vsock
    with host_server(f"{uds}_91") as server:
        guest.send(8001, 91, OP_REQUEST)
        guest.wait_packet(OP_RESPONSE)
        peer, _ = server.accept()
        with peer:
            guest.driver.queue(RX).set_avail_idx(guest.driver.queue(RX).avail_idx + 100)
            peer.sendall(b"into the void")
            wait_for(lambda: device.broken)
            assert guest.driver.interrupts.needs_reset and iothread._thread.is_alive()


def test_vhost_vsock_is_refused_when_missing(tmp_path):
    assert not vhost_vsock_available()                      # absent on these hosts
    with pytest.raises(VhostVsockUnavailable) as info:
        require_vhost_vsock()
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert "/dev/vhost-vsock" in str(info.value)
    fake = tmp_path / "vhost-vsock"
    fake.write_bytes(b"")
    assert vhost_vsock_available(str(fake))
    require_vhost_vsock(str(fake))


def mostly(value, other):
    return st.one_of(st.just(value), st.just(value), other)


# mostly packets of one live connection (guest port 5 -> host port 1), each field sometimes wrong
header_fields = st.tuples(
    mostly(CID, st.sampled_from([0, 2, 99])), mostly(HOST_CID, st.sampled_from([CID, 0])),
    mostly(5, st.integers(0, 0xFFFFFFFF)), mostly(1, st.integers(0, 0xFFFFFFFF)),
    st.one_of(st.integers(0, 80), st.integers(0, 0xFFFFFFFF)), mostly(TYPE_STREAM, st.integers(0, 3)),
    st.integers(0, 9), st.integers(0, 3), st.one_of(st.integers(0, 100), st.integers(0, 0xFFFFFFFF)),
    st.integers(0, 0xFFFFFFFF))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packets=st.lists(st.tuples(header_fields, st.binary(max_size=64), st.integers(0, 50)), max_size=12))
def test_random_packets_never_raise(memory, sockdir, idle_io, packets):
    uds = os.path.join(sockdir, "fuzz")
    device = make_vsock(CID, uds, idle_io, queue_size=16)
    try:
        with host_server(f"{uds}_1"):               # so that some guest REQUESTs open real connections
            guest = Guest(memory, device)
            guest.send(5, 1, OP_REQUEST)
            for fields, payload, cut in packets:
                raw = HEADER.pack(*fields) + payload
                guest.driver.queue(TX).add([raw[:len(raw) - cut] or b"\x00"], [])
                device.notify(TX)
                guest.packets()
            assert not device.broken
    finally:
        device.close()
        os.unlink(f"{uds}_1")


guest_op = st.tuples(st.sampled_from([OP_REQUEST, OP_RW, OP_SHUTDOWN, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RST]),
                     st.integers(6000, 6003), st.sampled_from([70, 71]), st.binary(max_size=64), st.integers(0, 3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(guest_op, max_size=16))
def test_any_vsock_state_round_trips(memory, sockdir, idle_io, ops):
    uds = os.path.join(sockdir, f"p{len(os.listdir(sockdir))}.sock")
    servers = [host_server(f"{uds}_70")]                  # port 71: nobody listens
    device = make_vsock(CID, uds, idle_io, queue_size=16)
    clone = None
    try:
        guest = Guest(memory, device)
        for op, guest_port, host_port, payload, flags in ops:
            guest.send(guest_port, host_port, op, payload if op == OP_RW else b"", flags=flags)
            guest.packets()
        state = device.save()
        host = device.detach_host()
        clone = VirtioVsock(CID, host, queue_size=16)
        clone.attach(memory, guest.driver.interrupts)
        clone.restore(through_json(state))
        assert clone.save() == state                       # the same table, the same streams
    finally:
        device.close()
        if clone is not None:
            clone.close()
        for server in servers:
            server.close()


def test_an_rst_still_waiting_for_a_buffer_is_saved_and_delivered_after_a_restore(memory, sockdir, idle_io):
    uds = os.path.join(sockdir, "v.sock")
    device = make_vsock(CID, uds, idle_io, queue_size=16)
    fresh = None
    with host_server(f"{uds}_70"):
        try:
            guest = Guest(memory, device, rx_buffers=0)     # no receive buffers: replies wait
            guest.send(6000, 70, OP_REQUEST)               # RESPONSE queued
            guest.send(6000, 70, OP_REQUEST)               # a second REQUEST: the connection is reset
            assert device.conns == {}
            state = through_json(device.save())
            assert [(r.key, r.op) for r in state.replies] == [(None, OP_RST)]
            fresh = make_vsock(CID, os.path.join(sockdir, "w.sock"), idle_io, queue_size=16)
            fresh.attach(memory, guest.driver.interrupts)
            guest.device = fresh
            fresh.restore(state)
            guest.post_rx(1)
            rst = guest.wait_packet(OP_RST)
            assert (rst.src_port, rst.dst_port) == (70, 6000)
        finally:
            device.close()
            if fresh is not None:
                fresh.close()


def test_a_new_guest_cid_resets_the_transport_and_holds_host_requests_until_the_guest_takes_it(vsock):
    """A restored VM's own CID (change_guest_cid): the config space shows it, the guest gets a
    TRANSPORT_RESET event, the connections of the old identity are gone, and a host request
    made before the guest handed its event buffer back (Linux does once it re-read the CID)
    reaches the guest only then, addressed to the new CID."""
    device, guest, uds = vsock
    events = guest.driver.queue(EVENT)
    events.add([], [4])
    device.notify(EVENT)
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    new = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with old, new:
        old.settimeout(5)
        old.connect(uds)
        old.sendall(b"CONNECT 52\n")
        request = guest.wait_packet(OP_REQUEST)
        guest.send(52, request.src_port, OP_RESPONSE)
        assert old.recv(64) == f"OK {request.src_port}\n".encode()
        assert events.take_used() == []

        device.change_guest_cid(9)
        assert struct.unpack("<Q", device.read_config(0, 8))[0] == 9
        [(head, written)] = events.take_used()
        assert events.written(head)[:written] == struct.pack("<I", 0)   # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        assert old.recv(64) == b"" and device.conns == {}
        assert device.cid_change_pending

        new.settimeout(5)
        new.connect(uds)
        new.sendall(b"CONNECT 52\n")
        wait_for(lambda: device._held)
        assert guest.packets() == []             # not before the guest took the new CID
        events.add([], [4])                      # what Linux does after handling the event
        device.notify(EVENT)
        assert not device.cid_change_pending
        rx = guest.driver.queue(RX)
        [(head, written)] = wait_for(rx.take_used)
        held = Packet(rx.written(head)[:HEADER.size], b"")
        assert (held.op, held.src_cid, held.dst_cid, held.dst_port) == (OP_REQUEST, HOST_CID, 9, 52)
        guest.send(52, held.src_port, OP_RESPONSE, src_cid=9)
        assert new.recv(64) == f"OK {held.src_port}\n".encode()
        guest.send(52, held.src_port, OP_RW, b"old cid", src_cid=CID)    # the old identity is not heard
        guest.send(52, held.src_port, OP_RW, b"new cid", src_cid=9)
        assert new.recv(64) == b"new cid"
        assert device.counters()["bad_src_cid"] == 1
    for bad in (2, 0xFFFFFFFF):
        with pytest.raises(ValueError, match="reserved"):
            device.change_guest_cid(bad)


def test_a_cid_change_survives_save_and_restore(memory, sockdir, idle_io):
    device = make_vsock(CID, os.path.join(sockdir, "v"), idle_io)
    try:
        device.change_guest_cid(12)
        state = through_json(device.save())
        assert state.guest_cid == 12 and state.events_pending == 1    # the driver is not up yet: kept for it
    finally:
        device.close()
    rebuilt = make_vsock(12, os.path.join(sockdir, "w"), idle_io)
    try:
        rebuilt.restore(state)
        assert struct.unpack("<Q", rebuilt.read_config(0, 8))[0] == 12
    finally:
        rebuilt.close()
