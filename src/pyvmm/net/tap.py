"""TAP devices: a host network interface whose frames a process reads and writes through an fd.

`open_tap()` opens /dev/net/tun and attaches to (or creates) a TAP interface with
IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a 12-byte vnet header (TUNSETVNETHDRSZ), so every
frame read or written starts with a `struct virtio_net_hdr_v1` (num_buffers included) in
the very format virtio-net 1.x guests use: the device passes headers through untouched.
The fd is non-blocking; the interface disappears when the fd closes (it is not persistent).

These are TUN/TAP ioctls on a /dev/net/tun fd, not KVM ioctls, so they live here and not in
pyvmm/kvm. `fcntl.ioctl` is fine for them (no signal has to interrupt them).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from ..errors import UserError

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1

# <linux/if_tun.h>: _IOW('T', nr, int) / _IOR('T', nr, unsigned int)
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# TUNSETOFFLOAD bits: what the reader of the TAP (the guest, through us) accepts
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the 24-byte union


class TapError(UserError):
    """A TAP device could not be opened or configured."""


class FdBackend:
    """A frame-per-read/write fd (a TAP, or a SOCK_SEQPACKET socket in tests) as a virtio-net back-end.

    Every frame carries the 12-byte virtio-net header in front. Reads and writes never
    block: they raise BlockingIOError instead.
    """

    name = "fd"

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def readv(self, buffers: list) -> int:
        """Read one frame (header included) into `buffers`; returns its length, 0 at end of file."""
        return os.readv(self.fd, buffers)

    def writev(self, buffers: list) -> int:
        """Write one frame (header included) gathered from `buffers`."""
        return os.writev(self.fd, buffers)

    def supported_offloads(self) -> int:
        """TUN_F_* bits the back-end can hand to a guest that accepts them (none for a plain fd)."""
        return 0

    def set_offloads(self, flags: int) -> None:
        """Tell the back-end which TUN_F_* offloads the guest accepts on receive."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Tap(FdBackend):
    """An open TAP interface (see `open_tap`)."""

    def __init__(self, fd: int, name: str, vnet_hdr: bool) -> None:
        super().__init__(fd)
        self.name = name
        self.vnet_hdr = vnet_hdr
        self._offloads = _probe_offloads(fd) if vnet_hdr else 0

    def supported_offloads(self) -> int:
        return self._offloads

    def set_offloads(self, flags: int) -> None:
        if self.vnet_hdr:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags & self._offloads)

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, fd={self.fd})"


def _probe_offloads(fd: int) -> int:
    """Which offloads does this kernel's TAP accept? Try them in growing sets, then switch all off."""
    accepted = 0
    for flags in (TUN_F_CSUM, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN, TUN_F_CSUM | TUN_F_UFO):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            accepted |= flags
        except OSError:
            pass
    # until the guest says what it accepts, the TAP must hand us complete, checksummed frames
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return accepted


def open_tap(name: str | None = None, *, vnet_hdr: bool = True) -> Tap:
    """Create (or attach to) TAP interface `name` ("%d" picks a free number; None: "pyvmm%d").

    The interface is created in the network namespace of the calling thread and is not
    brought up: see HostNetwork for addresses and links.
    """
    name = "pyvmm%d" if name is None else name
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise TapError(
            f"TAP name {name!r} is not a valid interface name (at most {IFNAMSIZ - 1} bytes, no spaces or '/')")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(f"cannot open a TAP: {TUN_DEVICE} is missing (load the tun module)") from None
    except PermissionError:
        raise TapError(f"cannot open a TAP: {TUN_DEVICE}: permission denied") from None
    except OSError as exc:
        raise TapError(f"cannot open a TAP: {TUN_DEVICE}: {exc.strerror}") from None
    try:
        flags = IFF_TAP | IFF_NO_PI
        if vnet_hdr:
            features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
            if not features & IFF_VNET_HDR:
                raise TapError("cannot open a TAP: this kernel's TUN driver has no virtio-net header support")
            flags |= IFF_VNET_HDR
        try:
            ifreq = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
        except OSError as exc:
            raise TapError(_tunsetiff_message(name, exc)) from None
        actual = _IFREQ.unpack(ifreq)[0].rstrip(b"\0").decode(errors="replace")
        if vnet_hdr:
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            except OSError as exc:
                raise TapError(
                    f"TAP {actual!r}: cannot use {VNET_HDR_SIZE}-byte virtio-net headers: {exc.strerror}") from None
        tap = Tap(fd, actual, vnet_hdr)
    except BaseException:
        os.close(fd)
        raise
    log.debug("opened TAP %s (offloads %#x)", tap.name, tap.supported_offloads())
    return tap


def _tunsetiff_message(name: str, exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return (f"cannot create TAP {name!r}: permission denied "
                "(CAP_NET_ADMIN is needed, or the TAP belongs to another user)")
    if exc.errno == errno.EBUSY:
        return f"TAP {name!r} is busy: another open fd (this or another process) is attached to it"
    if exc.errno == errno.EINVAL:
        return f"cannot use {name!r} as a TAP: an interface of that name exists and is not a TAP with these flags"
    return f"cannot create TAP {name!r}: {exc.strerror}"
