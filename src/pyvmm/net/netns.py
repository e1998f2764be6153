"""HostNetwork: the host side of a guest's network, set up and torn down by pyvmm itself.

`pyvmm run --net tap=auto` needs no `ip` command from the user. HostNetwork.open() does,
as root (CAP_NET_ADMIN and CAP_SYS_ADMIN), with the `ip` command from iproute2:

1. `ip netns add pyvmm-<pid>-<n>`: a fresh network namespace, so the guest's network
   touches none of the host's interfaces, routes or firewall rules
   (`namespace=False` skips this and works in the caller's own namespace);
2. a short-lived helper thread joins that namespace (setns) and opens a TAP there
   (`open_tap`, default name tap0); the TAP fd then works from any thread;
3. `ip -n NS link set lo up`, `ip -n NS link set TAP mtu M` (when an MTU is given),
   `ip -n NS address add 10.0.2.1/24 dev TAP`, `ip -n NS link set TAP up`: the
   namespace's kernel answers the guest at 10.0.2.1 (ARP, ping, any server started
   there); the guest is told to take 10.0.2.15 (`guest_kernel_ip_arg()` gives the
   kernel's ip= argument);
4. close(), also run at interpreter exit: closes the TAP fd, which removes the interface
   and its address, then removes the namespace as `ip netns del` does (umount, unlink).

A pyvmm killed by SIGKILL cannot close: its namespace stays in /run/netns. Before its first
namespace, each process deletes the pyvmm-<pid>-<n> namespaces whose process is gone (or
whose pid is its own: left by an earlier process with the same pid, whose names it would
otherwise collide with).

Reach the guest with `ip netns exec pyvmm-<pid>-<n> ping 10.0.2.15`, or from Python with
`run([...])` and `call_in_namespace(fn)`. There is no NAT and no route out of the namespace:
connecting it to the outside (a veth pair, masquerading) is the user's choice to make.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import itertools
import logging
import os
import re
import subprocess
import threading
from typing import Callable, TypeVar

from ..errors import UserError
from .tap import Tap, open_tap

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"  # where `ip netns add` bind-mounts named namespaces
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2

_names = itertools.count()
_swept = False
_OUR_NAME = re.compile(r"pyvmm-(\d+)-\d+")
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class HostNetworkError(UserError):
    """The host side of the guest network could not be set up."""


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _sweep_stale_namespaces() -> None:
    """Delete the namespaces killed pyvmm processes left behind (once per process)."""
    global _swept
    if _swept:
        return
    _swept = True
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return
    for name in names:
        match = _OUR_NAME.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_is_gone(pid):
            _remove_namespace(name)
            log.info("deleted network namespace %s, left by a pyvmm process that is gone", name)


def call_in_netns(netns: str, fn: Callable[..., T], *args) -> T:
    """Run fn(*args) on a helper thread that joined network namespace `netns`; return its result.

    Only that thread changes namespace (setns is per thread for CLONE_NEWNET) and it ends
    right after, so no other thread of the VMM ever sees the namespace. Sockets and TAPs
    created there stay in it and work from any thread.
    """
    outcome: dict = {}

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise HostNetworkError(f"cannot enter network namespace {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=f"pyvmm-netns-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _ip(*args: str) -> None:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise HostNetworkError("cannot set up the guest network: the ip command (iproute2) is missing") from None
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise HostNetworkError(f"ip {' '.join(args)}: {reason}")


def _remove_namespace(netns: str) -> None:
    """What `ip netns del` does, without a new process (a jail's keeper cannot fork once the VM,
    its PID namespace's init, has ended): detach the namespace's bind mount, remove the file."""
    path = os.path.join(NETNS_DIR, netns)
    try:
        if _libc.umount2(path.encode(), MNT_DETACH) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        os.unlink(path)
    except OSError as exc:
        log.warning("cannot remove network namespace %s: %s", netns, exc.strerror)


class HostNetwork:
    """A TAP with the host at `host_address` (default 10.0.2.1/24), in a fresh namespace by default.

        with HostNetwork() as net:
            device = VirtioNet(net.tap, mac=..., iothread=...)
            cmdline += " " + net.guest_kernel_ip_arg()
    """

    def __init__(self, *, namespace: bool = True, tap_name: str | None = None,
                 host_address: str = "10.0.2.1/24", guest_address: str = "10.0.2.15",
                 mtu: int | None = None) -> None:
        try:
            self.host_interface = ipaddress.IPv4Interface(host_address)
            self.guest_ip = ipaddress.IPv4Address(guest_address)
        except ValueError as exc:
            raise HostNetworkError(f"guest network: {exc}") from None
        if self.guest_ip not in self.host_interface.network or self.guest_ip == self.host_interface.ip:
            raise HostNetworkError(
                f"guest address {self.guest_ip} is not another address in {self.host_interface.network}")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise HostNetworkError(f"MTU {mtu} is outside 68..65535")
        self.namespace = namespace
        self.tap_name = tap_name
        self.mtu = mtu
        self.netns: str | None = None
        self.tap: Tap | None = None

    @property
    def host_ip(self) -> ipaddress.IPv4Address:
        return self.host_interface.ip

    def guest_kernel_ip_arg(self, device: str = "eth0") -> str:
        """Linux's ip= boot argument (nfsroot.rst) that gives the guest its address and gateway."""
        return f"ip={self.guest_ip}::{self.host_ip}:{self.host_interface.netmask}::{device}:off"

    def open(self) -> "HostNetwork":
        try:
            ip_ns: tuple[str, ...] = ()
            if self.namespace:
                _sweep_stale_namespaces()
                self.netns = f"pyvmm-{os.getpid()}-{next(_names)}"
                _ip("netns", "add", self.netns)
                ip_ns = ("-n", self.netns)
                self.tap = call_in_netns(self.netns, open_tap, self.tap_name or "tap0")
                _ip(*ip_ns, "link", "set", "lo", "up")
            else:
                self.tap = open_tap(self.tap_name)
            name = self.tap.name
            if self.mtu is not None:
                _ip(*ip_ns, "link", "set", "dev", name, "mtu", str(self.mtu))
            _ip(*ip_ns, "address", "add", str(self.host_interface), "dev", name)
            _ip(*ip_ns, "link", "set", "dev", name, "up")
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        log.info("guest network: TAP %s%s, host %s, guest %s", self.tap.name,
                 f" in namespace {self.netns}" if self.netns else "", self.host_interface, self.guest_ip)
        return self

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a host command where the TAP lives (`ip netns exec NS ...` with a namespace)."""
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return subprocess.run(argv, **kwargs)

    def call_in_namespace(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) where the TAP lives (e.g. to open a socket there)."""
        return call_in_netns(self.netns, fn, *args) if self.netns else fn(*args)

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.tap is not None:
            self.tap.close()  # a non-persistent TAP vanishes with its last fd
            self.tap = None
        if self.netns is not None:
            netns, self.netns = self.netns, None
            _remove_namespace(netns)

    def __enter__(self) -> "HostNetwork":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
