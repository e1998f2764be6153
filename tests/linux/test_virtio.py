"""Virtio devices seen by the real Debian guest: disks, console, rng, network, vsock, vhost-user.

Each boot checks many things at once (boots cost tens of seconds on the software CPU).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers.linux_guest import BOOT_TIMEOUT


def make_ext2(path, size_mb: int = 32) -> None:
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-F", str(path)], check=True)


class PortReader(threading.Thread):
    """The host end of a virtio-console port: connects once pyvmm listens, keeps what arrives."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path, self.data = path, b""
        self.sock: socket.socket | None = None

    def run(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(self.path)
                break
            except OSError:
                self.sock.close()
                self.sock = None
                time.sleep(0.2)
        if self.sock is None:
            return
        self.sock.sendall(b"from-host\n")
        while chunk := self.sock.recv(4096):
            self.data += chunk


@pytest.fixture
def vhost_user_disk(tmp_path):
    """qemu-storage-daemon exporting a raw image over vhost-user-blk."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.fail("qemu-storage-daemon is missing (scripts/setup installs qemu-system-common)")
    image, sock = tmp_path / "vhost.img", tmp_path / "vhost.sock"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    daemon = subprocess.Popen([
        "qemu-storage-daemon", "--blockdev", f"driver=file,node-name=disk0,filename={image}",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline and daemon.poll() is None:
        time.sleep(0.05)
    if not sock.exists():
        daemon.kill()
        pytest.fail(f"qemu-storage-daemon did not start: {daemon.stderr.read().decode()[-500:]}")
    yield image, sock
    daemon.kill()
    daemon.wait()


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_disks_console_and_rng(pyvmm, tmp_path, transport, vhost_user_disk):
    disk, readonly = tmp_path / "disk.img", tmp_path / "ro.img"
    make_ext2(disk)
    readonly.write_bytes(b"read-only-disk-contents".ljust(1 << 20, b"\0"))
    vhost_image, vhost_sock = vhost_user_disk
    port_sock = str(tmp_path / "port.sock")
    reader = PortReader(port_sock)
    reader.start()
    script = r"""
set -e
cat /sys/block/vda/serial; echo
cat /sys/block/vdb/ro
head -c 23 /dev/vdb; echo
mkdir -p /mnt/d && mount -t ext2 /dev/vda /mnt/d
echo written-by-the-guest > /mnt/d/hello.txt
sync && umount /mnt/d
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null; then echo ro-write-succeeded; fi
echo vhost-user-data | dd of=/dev/vdc bs=512 conv=sync,fsync 2>/dev/null
dd if=/dev/vdc bs=512 count=1 2>/dev/null | head -c 15; echo
cat /sys/class/misc/hw_random/rng_current
head -c 64 /dev/hwrng | wc -c
tty
for p in /sys/class/virtio-ports/*; do
    if [ "$(cat $p/name 2>/dev/null)" = org.pyvmm.test ]; then dev=/dev/${p##*/}; fi
done
echo port=$dev
exec 3<>$dev   # one open for both directions: Linux drops host data for a closed port
echo to-host-via-port >&3
head -n 1 <&3
"""
    result = pyvmm("run", "--timeout", "300", "--console", f"virtio,transport={transport}", "--rng", transport,
                   "--disk", f"{disk},serial=pyvmm-disk-1,transport={transport}",
                   "--disk", f"{readonly},readonly,transport={transport}",
                   "--disk", f"vhost-user={vhost_sock},transport={transport}",
                   "--console-port", f"org.pyvmm.test={port_sock}",
                   "--", "sh", "-c", script)
    out = result.stdout
    assert result.returncode == 0, (out[-3000:], result.stderr[-2000:])
    assert "pyvmm-disk-1" in out
    lines = out.splitlines()
    assert lines[lines.index("pyvmm-disk-1") + 1] == "1"          # vdb is read-only
    assert "read-only-disk-contents" in out
    assert "ro-write-succeeded" not in out
    assert "vhost-user-data" in out
    assert "virtio_rng" in out and "\n64\n" in out
    assert "/dev/hvc0" in out                                      # the command's stdio is the virtio console
    assert re.search(r"port=/dev/vport\dp\d", out)
    assert "from-host" in out                                      # host -> guest over the named port
    reader.join(timeout=10)
    assert b"to-host-via-port" in reader.data                      # guest -> host
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    dump = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(disk)], capture_output=True, text=True)
    assert dump.stdout.strip() == "written-by-the-guest"
    assert readonly.read_bytes()[:23] == b"read-only-disk-contents"
    assert vhost_image.read_bytes()[:15] == b"vhost-user-data"


def _wait_for_netns(pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in names.splitlines():
            if line.split()[0].startswith(f"pyvmm-{pid}-"):
                return line.split()[0]
        time.sleep(0.2)
    raise AssertionError("pyvmm created no network namespace")


BLOB = bytes(range(256)) * 4096  # 1 MiB the host serves
HTTP_SERVER = """
import hashlib, http.server
BLOB = bytes(range(256)) * 4096

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB)

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        reply = f"{len(data)} {hashlib.md5(data).hexdigest()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

http.server.HTTPServer(("10.0.2.1", 8000), Handler).serve_forever()
"""


def _connect_to_guest(uds: str, port: int, payload: bytes, done: dict) -> None:
    """Host-initiated vsock: retry `CONNECT port` until the guest listens, then send payload."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(uds)
                sock.sendall(f"CONNECT {port}\n".encode())
                reply = sock.makefile("rb").readline()
                if reply.startswith(b"OK "):
                    sock.sendall(payload)
                    done["host-connect"] = reply
                    return
        except OSError:
            pass
        time.sleep(0.5)


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_network_and_vsock(pyvmm, tmp_path, transport, monkeypatch):
    if transport == "pci":  # the NIC's transmit thread too (off by default: net_tx_thread.py)
        monkeypatch.setenv("PYVMM_NET_TX_THREAD", "1")
    uds = str(tmp_path / "vsock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_1234")  # guest -> host connections to port 1234 arrive here
    listener.listen(1)
    received = {}

    def vsock_server() -> None:
        conn, _ = listener.accept()
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        received["vsock"] = data
        conn.sendall(b"vsock-reply\n")
        conn.close()

    threading.Thread(target=vsock_server, daemon=True).start()
    threading.Thread(target=_connect_to_guest, args=(uds, 4321, b"host-to-guest\n", received), daemon=True).start()
    # HTTP both ways (busybox wget): each transfer ends only when the peer has it all, so
    # nothing is still in flight when the guest powers off.
    server_script = tmp_path / "http_server.py"
    server_script.write_text(HTTP_SERVER)
    script = r"""
cat /sys/class/net/eth0/address
ping -c 1 -W 5 10.0.2.1 >/dev/null && echo ping-ok
tries=0
until wget -q -O /tmp/got http://10.0.2.1:8000/blob; do tries=$((tries+1)); [ $tries -gt 60 ] && break; sleep 1; done
md5sum /tmp/got
head -c 786432 /dev/urandom | base64 | tr -d '\n' > /tmp/blob  # busybox wget posts text (stops at NUL)
md5sum /tmp/blob
echo "upload: $(wget -q -O - --post-file /tmp/blob http://10.0.2.1:8000/upload)"
echo vsock-hello | pyvmm-vsock connect 1234
echo cid=$(pyvmm-vsock cid)
pyvmm-vsock listen 4321 </dev/null
"""
    run = pyvmm.start("run", "--timeout", "300", "--net", f"tap=auto,mac=52:54:00:00:00:42,transport={transport}",
                      "--vsock", f"cid=7,uds={uds},transport={transport}", "--", "sh", "-c", script)
    server = None
    try:
        netns = _wait_for_netns(run.pid, 60)
        server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(server_script)])
        result = run.finish(BOOT_TIMEOUT)
    finally:
        run.kill()
        if server is not None:
            server.kill()
            server.wait()
    out = result.stdout
    assert result.returncode == 0, (out[-3000:], result.stderr[-2000:])
    assert "52:54:00:00:00:42" in out and "ping-ok" in out
    assert re.search(r"^([0-9a-f]{32})  /tmp/got", out, re.M).group(1) == hashlib.md5(BLOB).hexdigest()
    guest_md5 = re.search(r"^([0-9a-f]{32})  /tmp/blob", out, re.M).group(1)
    assert f"upload: 1048576 {guest_md5}" in out, out[-1500:]
    assert received.get("vsock") == b"vsock-hello\n"
    assert "vsock-reply" in out
    assert "cid=7" in out
    assert received.get("host-connect", b"").startswith(b"OK ") and "host-to-guest" in out


def test_flushed_data_survives_sigkill_of_the_vmm(pyvmm, tmp_path):
    disk = tmp_path / "raw.img"
    disk.write_bytes(bytes(1 << 20))
    script = ("printf 'durable-%s' payload | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null && "
              "echo FLUSHED && sleep 600")
    run = pyvmm.start("run", "--disk", f"{disk},transport=pci", "--", "sh", "-c", script)
    try:
        run.wait_for(b"FLUSHED")
    finally:
        run.kill()  # SIGKILL
    run.check_kernel_warnings()
    assert disk.read_bytes()[:15] == b"durable-payload"
    assert hashlib.sha256(disk.read_bytes()[512:]).digest() == hashlib.sha256(bytes((1 << 20) - 512)).digest()
