"""The host side shared by the benchmarks that give the guest a disk and a NIC on a TAP
(virtio_io.py, tools_io.py, net_counts.py): the network's addresses, TCP peers listening in
the guest's network namespace, `ip` and process helpers, and the scratch disk image."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import threading
import time

MAC = "52:54:00:12:34:56"
HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.15"
IP_TOKEN = f"pyvmm.ip={GUEST_IP}/24,{HOST_IP}"    # what pyvmm's runner adds for --net tap=auto
TX_PORT, RX_PORT = 5001, 5002


class BenchError(Exception):
    """A run failed; the message is one line (plus an optional console tail)."""


# --- host end of the network tests ------------------------------------------------------


class Peer(threading.Thread):
    """One TCP connection from the guest, on a listening socket opened in the guest's namespace.

    mode "sink": count what arrives until EOF (guest -> host).
    mode "source": send `nbytes`, shut down writing, wait for the guest to close (host -> guest).
    `seconds` is accept -> EOF.
    """

    def __init__(self, listener: socket.socket, mode: str, nbytes: int, timeout: float) -> None:
        super().__init__(daemon=True, name=f"virtio_io-{mode}")
        self.listener, self.mode, self.nbytes, self.timeout = listener, mode, nbytes, timeout
        self.bytes = 0
        self.seconds: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.listener.settimeout(self.timeout)
            conn, _ = self.listener.accept()
        except OSError as exc:  # closed at the end of the run, or timed out
            self.error = f"no connection: {exc}"
            return
        with conn:
            conn.settimeout(self.timeout)
            t0 = time.monotonic()
            try:
                if self.mode == "source":
                    block = memoryview(bytes(1 << 20))
                    left = self.nbytes
                    while left:
                        sent = conn.send(block[:min(left, len(block))])
                        left -= sent
                        self.bytes += sent
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):
                        pass
                else:
                    while chunk := conn.recv(1 << 20):
                        self.bytes += len(chunk)
                self.seconds = time.monotonic() - t0
            except OSError as exc:
                self.error = f"{self.mode}: {exc}"


def _listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s


def open_peers(netns: str, nbytes: int, timeout: float) -> tuple[Peer, Peer]:
    """Listening sockets on 0.0.0.0:{TX,RX}_PORT inside `netns` (created there by a helper thread)."""
    from pyvmm.net.netns import call_in_netns

    def make() -> tuple[socket.socket, socket.socket]:
        socks = []
        for port in (TX_PORT, RX_PORT):
            s = _listener()
            s.bind(("0.0.0.0", port))
            s.listen(4)
            socks.append(s)
        return socks[0], socks[1]

    deadline = time.monotonic() + 10
    while True:  # `ip netns add` creates the file before it bind-mounts the namespace on it
        try:
            tx, rx = call_in_netns(netns, make)
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"cannot open the host end of the network tests in {netns}: {exc}") from None
            time.sleep(0.05)
        except Exception as exc:  # HostNetworkError (setns on a file not yet a namespace)
            if time.monotonic() > deadline:
                raise BenchError(f"cannot enter network namespace {netns}: {exc}") from None
            time.sleep(0.05)
    peers = Peer(tx, "sink", nbytes, timeout), Peer(rx, "source", nbytes, timeout)
    for p in peers:
        p.start()
    return peers


def close_peers(peers) -> None:
    for p in peers:
        try:
            p.listener.close()  # also ends a thread still waiting in accept()
        except OSError:
            pass


def ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise BenchError(f"ip {' '.join(args)}: {reason}")


def qemu_tap_namespace(name: str) -> str:
    """A fresh namespace `name` with tap0 at HOST_IP/24 for QEMU's -netdev tap (pyvmm makes its
    own with tap=auto); the caller deletes it (`ip netns del`)."""
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    ip("-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap")
    ip("-n", name, "address", "add", f"{HOST_IP}/24", "dev", "tap0")
    ip("-n", name, "link", "set", "tap0", "up")
    return name


def running(pid: int) -> bool:
    """Whether child `pid` has not exited yet (without reaping it: wait4 collects its rusage later)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def kill_group(proc: subprocess.Popen | None) -> None:
    """Kill a VMM's process group if it still runs, and reap it."""
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def remove_namespace(vmm: str, proc: subprocess.Popen | None, netns: str | None) -> None:
    """A run's network namespace: pyvmm's own pyvmm-<pid>-<n> (left behind only if pyvmm was
    killed), or the one made for QEMU's TAP."""
    if vmm == "pyvmm" and proc is not None:
        for name in list_netns():
            if name.startswith(f"pyvmm-{proc.pid}-"):
                ip("netns", "del", name, check=False)
    if vmm == "qemu" and netns is not None:
        ip("-n", netns, "link", "del", "tap0", check=False)
        ip("netns", "del", netns, check=False)


def list_netns() -> list[str]:
    try:
        return os.listdir("/run/netns")
    except OSError:
        return []


def _disk_image(path: pathlib.Path, mib: int) -> None:
    """A raw image with every block allocated (zeros written, not a sparse file)."""
    block = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
