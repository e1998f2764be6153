"""Host networking: a real TAP in a fresh network namespace, driven through VirtioNet without a guest.

The fake driver transmits an ARP request for the host address and an ICMP echo request;
the namespace's kernel answers both, and the answers arrive in the fake guest's RX buffers.
That is the whole path a guest uses: virtqueue -> writev(TAP) -> host kernel -> TAP -> readv.
"""

import ipaddress
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from helpers.virtio_driver import FakeDriver
from pyvmm.devices.virtio.net import (
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4, VirtioNet,
)
from pyvmm.iothread import IoThread
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.net import (
    HostNetwork, TapError, VhostNetUnavailable, open_tap, require_vhost_net, vhost_net_available,
)
from pyvmm.net import tap as tap_module
from pyvmm.net.netns import NETNS_DIR

MAC = bytes.fromhex("525400123456")
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.1"
HDR = 12
RX, TX = 0, 1


def _tun_unavailable() -> str | None:
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: this host has no TUN/TAP driver"
    if os.geteuid() != 0:
        return "a TAP in a new network namespace needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    if subprocess.run(["which", "ip"], capture_output=True).returncode:
        return "the ip command (iproute2) is missing"
    return None


needs_tun = pytest.mark.skipif(_tun_unavailable() is not None, reason=_tun_unavailable() or "")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def ethernet(dst: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + MAC + struct.pack("!H", ethertype) + payload


def arp_request() -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC, ipaddress.IPv4Address(GUEST_IP).packed,
                      bytes(6), ipaddress.IPv4Address(HOST_IP).packed)
    return ethernet(b"\xff" * 6, 0x0806, arp)


def echo_request(ident: int, seq: int, data: bytes, host_mac: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return ethernet(host_mac, 0x0800, ipv4(GUEST_IP, HOST_IP, 1, icmp))


class Guest:
    """A fake guest on a VirtioNet: posts RX buffers, transmits, collects received frames."""

    def __init__(self, device: VirtioNet, driver: FakeDriver) -> None:
        self.device, self.driver = device, driver
        self.posted: list[int] = []

    def post_rx(self, count: int) -> None:
        q = self.driver.queue(RX)
        for _ in range(count):
            q.add([], [HDR + 1514])
        self.device.notify(RX)

    def send(self, payload: bytes, header: bytes = bytes(HDR)) -> None:
        self.driver.queue(TX).add([header, payload], [])
        self.device.notify(TX)

    def receive(self, match, timeout: float = 5.0) -> bytes:
        """The first received frame (without its header) for which match(frame) is true."""
        q = self.driver.queue(RX)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for head, length in q.take_used():
                self.post_rx(1)  # keep the ring stocked, like a driver
                data = q.written(head)[:length]
                assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
                if match(data[HDR:]):
                    return data[HDR:]
            time.sleep(0.002)
        raise AssertionError("no matching frame arrived")


@pytest.fixture
def network():
    with HostNetwork() as net:
        yield net


@pytest.fixture
def guest(network):
    iothread = IoThread("test-tap-io")
    iothread.start()
    with GuestMemory.from_specs([RegionSpec(0, 8 << 20)]) as memory:
        device = VirtioNet(network.tap, mac=MAC, iothread=iothread, queue_size=64)
        driver = FakeDriver(memory, device)
        g = Guest(device, driver)
        g.post_rx(32)
        yield g
        device.reset()
        iothread.stop()


@needs_tun
def test_arp_and_ping_through_a_real_tap(network, guest):
    guest.send(arp_request())
    reply = guest.receive(lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02")
    op, sha, spa, tha, tpa = struct.unpack("!H6s4s6s4s", reply[20:42])
    assert reply[:6] == MAC and tha == MAC
    assert ipaddress.IPv4Address(spa) == ipaddress.IPv4Address(HOST_IP)
    assert ipaddress.IPv4Address(tpa) == ipaddress.IPv4Address(GUEST_IP)
    host_mac = sha

    guest.send(echo_request(0x1234, 1, b"pyvmm ping", host_mac))
    echo = guest.receive(lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0)
    assert echo[:6] == MAC and echo[6:12] == host_mac
    assert echo[26:30] == ipaddress.IPv4Address(HOST_IP).packed
    assert struct.unpack("!HH", echo[38:42]) == (0x1234, 1) and echo[42:] == b"pyvmm ping"
    stats = guest.device.stats()
    assert stats["tx_packets"] == 2 and stats["tx_dropped"] == 0 and stats["rx_packets"] >= 2


@needs_tun
def test_checksum_offload_header_reaches_the_host_kernel(network, guest):
    """A UDP datagram with NEEDS_CSUM and an unfinished checksum is accepted: the header was honoured."""
    receiver = network.call_in_namespace(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with receiver:
        receiver.bind((HOST_IP, 0))
        receiver.settimeout(5)
        port = receiver.getsockname()[1]
        guest.send(arp_request())
        host_mac = guest.receive(lambda f: f[12:14] == b"\x08\x06")[22:28]
        data = b"offloaded checksum"
        udp = struct.pack("!HHHH", 4000, port, 8 + len(data), 0xBAD) + data  # checksum left to the host
        csum_start, csum_offset = 14 + 20, 6
        header = struct.pack("<BBHHHHH", 1, 0, 0, 0, csum_start, csum_offset, 0)
        guest.send(ethernet(host_mac, 0x0800, ipv4(GUEST_IP, HOST_IP, 17, udp)), header)
        assert receiver.recvfrom(100) == (data, (GUEST_IP, 4000))


@needs_tun
def test_real_tap_offers_offloads(network):
    iothread = IoThread()
    device = VirtioNet(network.tap, mac=MAC, iothread=iothread)
    iothread.stop()
    for feature in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_GUEST_TSO4):
        assert device.offered_features & feature


@needs_tun
def test_host_network_sets_up_and_tears_down(network):
    netns, name = network.netns, network.tap.name
    assert os.path.exists(os.path.join(NETNS_DIR, netns))
    shown = network.run(["ip", "-o", "-4", "address", "show", "dev", name], capture_output=True, text=True)
    assert "10.0.2.1/24" in shown.stdout
    link = network.run(["ip", "-o", "link", "show", "dev", name], capture_output=True, text=True).stdout
    assert ",UP" in link or "<UP" in link
    assert network.guest_kernel_ip_arg() == "ip=10.0.2.15::10.0.2.1:255.255.255.0::eth0:off"
    network.close()
    assert network.tap is None and not os.path.exists(os.path.join(NETNS_DIR, netns))
    network.close()  # twice is fine


@needs_tun
def test_open_tap_errors_are_one_line(network):
    with pytest.raises(TapError, match="is busy"):
        network.call_in_namespace(open_tap, network.tap.name)
    with pytest.raises(TapError, match="not a TAP"):
        network.call_in_namespace(open_tap, "lo")
    with pytest.raises(TapError, match="not a valid interface name"):
        open_tap("x" * 16)


def test_missing_tun_device_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tap_module, "TUN_DEVICE", str(tmp_path / "tun"))
    with pytest.raises(TapError, match=r"tun is missing \(load the tun module\)$"):
        open_tap()


def test_vhost_net_refusal(tmp_path):
    missing = str(tmp_path / "vhost-net")
    assert vhost_net_available(missing) is False
    with pytest.raises(VhostNetUnavailable, match=f"^vhost-net requested but {missing} is missing: "):
        require_vhost_net(missing)
    not_vhost = tmp_path / "not-vhost"
    not_vhost.write_bytes(b"")
    with pytest.raises(VhostNetUnavailable, match="is not a vhost-net device"):
        require_vhost_net(str(not_vhost))
    if not os.path.exists("/dev/vhost-net"):  # as on our machines
        assert vhost_net_available() is False
        with pytest.raises(VhostNetUnavailable, match="^vhost-net requested but /dev/vhost-net is missing: "):
            require_vhost_net()


@needs_tun
def test_namespaces_of_killed_processes_are_deleted_before_the_next_one(monkeypatch):
    # a pyvmm killed by SIGKILL cannot delete its namespace: the next HostNetwork does
    child = subprocess.run(
        [sys.executable, "-c", "import os, signal; from pyvmm.net import HostNetwork; net = HostNetwork().open(); "
                         "print(net.netns, flush=True); os.kill(os.getpid(), signal.SIGKILL)"],
        capture_output=True, text=True)
    left = child.stdout.strip()
    assert child.returncode == -9 and left.startswith("pyvmm-"), child.stderr
    assert os.path.exists(os.path.join(NETNS_DIR, left))
    from pyvmm.net import netns as netns_module
    monkeypatch.setattr(netns_module, "_swept", False)
    with HostNetwork() as net:
        assert os.path.exists(os.path.join(NETNS_DIR, net.netns))
        assert not os.path.exists(os.path.join(NETNS_DIR, left))
