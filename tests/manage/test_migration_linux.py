"""Live migration of the default Debian guest (the software CPU here) between two managed VMs
on two "hosts": two network namespaces joined by a veth pair, the migration over TCP between
them. Each namespace has its own TAP of the same name (the destination's VM opens its own by
name) with the same host-side address and MAC, as two hypervisor hosts on one guest network
would. A host-side TCP client in the first namespace talks to a server in the guest through
the TAP the whole time; after the migration the first namespace routes the guest's address
over the veth to the second (the network learning where the guest went), and the same TCP
connection goes on: its state lives in guest RAM. The guest's console ticker and the
connection's numbered echoes show nothing lost or repeated; a disk both sides see by the same
path keeps what the guest wrote before and after."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings
from pyvmm.manage.client import connect
from pyvmm.net.netns import call_in_netns

from helpers.managed import read_until, ticks

PROMPT = b"pyvmm:~# "
TAP, TAP_MAC, GUEST_MAC = "tapmig0", "02:00:00:00:0a:01", "52:54:00:00:0a:0f"
GUEST, PORT, MIGRATION_PORT = "10.0.2.15", 7000, 4444


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert done.returncode == 0, (args, done.stderr)


@pytest.fixture
def hosts():
    """Namespaces A (the source's host) and B (the destination's), veth 10.9.0.1 <-> 10.9.0.2,
    and in each a persistent TAP with the same MAC: the guest's ARP entry for its gateway
    (10.0.2.1, which pyvmm puts on the TAP it opens by name) holds on both hosts."""
    tag = f"{os.getpid() % 100000}"
    a, b = f"pvmigA{tag}", f"pvmigB{tag}"
    ip("netns", "add", a)
    ip("netns", "add", b)
    try:
        ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for ns, veth, address in ((a, f"va{tag}", "10.9.0.1/24"), (b, f"vb{tag}", "10.9.0.2/24")):
            ip("link", "set", veth, "netns", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "address", "add", address, "dev", veth)
            ip("-n", ns, "link", "set", veth, "up")
            ip("-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
            ip("-n", ns, "link", "set", TAP, "address", TAP_MAC)   # pyvmm gives it 10.0.2.1/24
        subprocess.run(["ip", "netns", "exec", b, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cli_in(env, netns: str, *args: str) -> str:
    values, _ = env
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "pyvmm.cli", *args],
                            capture_output=True, env=values, timeout=900, text=True)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


class EchoClient:
    """A TCP connection from namespace A (10.9.0.1) to the guest's echo server: a line every
    0.1 s, each numbered, each echo checked."""

    def __init__(self, netns: str) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("10.9.0.1", 0))
            return sock

        self.sock = call_in_netns(netns, make)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock.settimeout(5)
                self.sock.connect((GUEST, PORT))
                break
            except OSError:
                assert time.monotonic() < deadline, "the guest's echo server never answered"
                self.sock.close()
                self.sock = call_in_netns(netns, make)
                time.sleep(0.5)
        self.echoed = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        reader = self.sock.makefile("rb")
        self.sock.settimeout(120)   # across the migration's downtime and the route change
        number = 0
        try:
            while not self._stop.is_set():
                number += 1
                self.sock.sendall(b"line-%d\n" % number)
                answer = reader.readline()
                if answer != b"line-%d\n" % number:
                    self.error = f"sent line-{number}, got {answer!r}"
                    return
                self.echoed = number
                time.sleep(0.1)
        except OSError as exc:
            self.error = f"after {number - 1} echoes: {exc}"

    def wait_for(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.echoed < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"only {self.echoed} echoes"
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(30)
        self.sock.close()


def test_the_default_guest_migrates_over_tcp_between_two_hosts_keeping_its_tcp_connection(env, hosts, tmp_path):
    a, b = hosts
    _, host = env
    disk = tmp_path / "shared.img"      # one path both "hosts" see
    disk.write_bytes(bytes(8 << 20))
    document = {"machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
                "drives": [{"drive_id": "data", "path_on_host": str(disk), "is_root_device": False,
                            "is_read_only": False}],
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC}],
                "pyvmm": {"accel": "tcg", "kernel_args": f"pyvmm.ip={GUEST}/24,10.0.2.1 {CONSOLE_LOGLEVEL}"}}
    host.define(document, "src")
    host.define(document, "dst")
    address = f"tcp:10.9.0.2:{MIGRATION_PORT}"
    assert "waits for a migration" in cli_in(env, b, "start", "dst", "--incoming", address)
    cli_in(env, a, "start", "src")
    src, dst = host.vm("src"), host.vm("dst")
    conn = src.open_console(replay=1 << 20)
    read_until(conn, re.escape(PROMPT))
    conn.sendall(b"echo before > /tmp/m; dd if=/tmp/m of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; "
                 b"(nc -ll -p %d -e cat &) ; i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.2; done &\n" % PORT)
    read_until(conn, rb"tick-5\r?\n")
    conn.close()
    client = EchoClient(a)
    try:
        client.wait_for(20)
        migrated = cli_in(env, a, "migrate", "src", address)
        assert re.search(r"Domain 'src' migrated to tcp:10\.9\.0\.2:4444: .* downtime \d+ ms", migrated), migrated
        ip("-n", a, "route", "add", f"{GUEST}/32", "via", "10.9.0.2")   # the guest is behind host B now
        assert src.state() == "migrated" and dst.state() == "running"
        at_migration = client.echoed
        client.wait_for(at_migration + 30)       # the same connection, through B's TAP
        conn = dst.open_console(replay=0)
        conn.sendall(b"kill %1; sleep 0.5; dd if=/dev/vda bs=512 count=1 2>/dev/null | head -1; "
                     b"echo after > /tmp/m; dd if=/tmp/m of=/dev/vda bs=512 seek=1 count=1 conv=fsync 2>/dev/null; "
                     b"echo disk-done\n")
        output = read_until(conn, rb"disk-done\r?\n(?s:.*)" + re.escape(PROMPT))
        conn.close()
        assert b"before" in output
    finally:
        client.close()
    assert client.error is None, client.error
    with open(disk, "rb") as image:
        assert image.read(512).startswith(b"before\n") and image.read(512).startswith(b"after\n")
    before, after = src.console_history(), dst.console_history()
    seen = ticks(before + after)
    assert seen == list(range(1, len(seen) + 1)) and ticks(after), "console ticks lost or repeated"
    warnings = find_kernel_warnings(before + after)
    assert not warnings, describe(warnings)
    final = src.migration_progress()
    assert final["status"] == "completed" and final["mode"] == "precopy", final
    cli_in(env, b, "destroy", "dst")
