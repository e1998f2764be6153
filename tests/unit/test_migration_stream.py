"""The migration stream's framing and page encoding, over a socket pair: frames round trip,
any flipped byte is caught by the checksum, a cut stream and a foreign peer are one-line
errors, and page runs (zero ones as markers) land in guest memory exactly."""

from __future__ import annotations

import socket

import pytest

from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.migration.channel import ACK, PAGES, STATE, Channel, MigrationError, StreamError, parse_address
from pyvmm.migration.pages import FIRST_PASS, PAGE, PageReceiver, PageWriter, send_all_ram, send_pages


def pair():
    a, b = socket.socketpair()
    return Channel(a, "the source"), Channel(b, "the destination")


def test_addresses():
    assert str(parse_address("unix:/tmp/x.sock")) == "unix:/tmp/x.sock"
    tcp = parse_address("tcp:10.0.0.1:4444")
    assert (tcp.kind, tcp.host, tcp.port) == ("tcp", "10.0.0.1", 4444)
    for bad in ("x", "unix:", "tcp:host", "tcp:host:port", "tcp::1", "tcp:h:99999", "file:/x"):
        with pytest.raises(MigrationError, match="expected unix:PATH or tcp:HOST:PORT"):
            parse_address(bad)


def test_frames_round_trip_and_every_flipped_byte_is_caught():
    sender, receiver = pair()
    sender.send_preamble()
    sender.send(STATE, b"state bytes", flags=3)
    receiver.receive_preamble()
    assert receiver.receive() == (STATE, 3, b"state bytes")
    sender.send(ACK)
    raw = receiver.sock.recv(100)
    assert len(raw) == 12
    for position in range(len(raw)):
        for bit in (0x01, 0x80):
            damaged = bytearray(raw)
            damaged[position] ^= bit
            s, r = pair()
            s.sock.sendall(bytes(damaged))
            s.sock.close()
            with pytest.raises(StreamError, match="corrupted|ended in"):
                r.receive()


def test_a_cut_stream_and_a_foreign_peer():
    sender, receiver = pair()
    sender.send(PAGES, b"x" * 100)
    data = receiver.sock.recv(1000)
    s, r = pair()
    s.sock.sendall(data[:50])
    s.sock.close()
    with pytest.raises(StreamError, match=r"ended in a PAGES frame \(after 50 bytes\)"):
        r.receive()
    s, r = pair()
    s.sock.sendall(b"GET / HTTP/1.1\r\n")
    with pytest.raises(StreamError, match="does not speak pyvmm's migration protocol"):
        r.receive_preamble()


def memory(size=1 << 20):
    return GuestMemory.from_specs([RegionSpec(0, size)])


def test_pages_arrive_exactly_with_zero_pages_as_markers():
    source, target = memory(), memory()
    try:
        source.write(0x3000, b"\x01" * PAGE)
        source.write(0x5000, b"\x02" * (3 * PAGE))
        source.write(0xF_F000, b"\x03" * 10)
        target.write(0x8000, b"\xff" * PAGE)   # stale on the destination: a later round's zero run clears it
        sender, receiver = pair()
        frames = []
        writer = PageWriter(sender, lambda size: frames.append(receiver.receive()), FIRST_PASS)
        send_all_ram(source, writer)
        assert writer.pages == 5 and writer.zero_pages == 256 - 5
        assert sum(len(payload) for _, _, payload in frames) < 6 * PAGE   # zeros are not sent
        apply = PageReceiver(target)
        for kind, flags, payload in frames:
            apply.apply(payload, flags)
        frames.clear()
        writer = PageWriter(sender, lambda size: frames.append(receiver.receive()))
        send_pages(source, [0x3000, 0x8000], writer)
        for kind, flags, payload in frames:
            apply.apply(payload, flags)
        assert target.read(0, 1 << 20) == source.read(0, 1 << 20)
    finally:
        source.close()
        target.close()


def test_pages_outside_ram_are_refused():
    import struct

    target = memory()
    try:
        with pytest.raises(StreamError, match="not in this guest's RAM"):
            PageReceiver(target).apply(struct.pack("<QI", 1 << 20, 1 << 1 | 1), 0)
        with pytest.raises(StreamError, match="ends inside a page"):
            PageReceiver(target).apply(struct.pack("<QI", 0, 1 << 1) + b"x" * 10, 0)
    finally:
        target.close()
