"""vhost-net capability check: can the kernel run the virtio-net data path for us?

vhost-net moves RX/TX out of the VMM into a kernel thread. pyvmm serves virtio-net in
user space (devices/virtio/net.py); a user who asks for vhost-net explicitly gets a clear
refusal when the host cannot provide it instead of a silent fall-back.
"""

from __future__ import annotations

import fcntl
import os
import struct

from ..errors import UserError

VHOST_NET_DEVICE = "/dev/vhost-net"
VHOST_GET_FEATURES = 0x8008AF00  # _IOR(VHOST_VIRTIO, 0x00, __u64)


class VhostNetUnavailable(UserError):
    """vhost-net was requested and the host cannot provide it."""


def vhost_net_features(path: str = VHOST_NET_DEVICE) -> int:
    """The virtio features the kernel's vhost-net offers; raises VhostNetUnavailable."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VhostNetUnavailable(f"vhost-net requested but {path} is missing: load the vhost_net module "
                                  "or drop the vhost option to use pyvmm's own virtio-net") from None
    except OSError as exc:
        raise VhostNetUnavailable(f"vhost-net requested but {path} cannot be opened: {exc.strerror}") from None
    try:
        # a device node that does not answer VHOST_GET_FEATURES is not vhost-net (or not usable)
        return struct.unpack("Q", fcntl.ioctl(fd, VHOST_GET_FEATURES, bytes(8)))[0]
    except OSError as exc:
        raise VhostNetUnavailable(f"vhost-net requested but {path} is not a vhost-net device: {exc.strerror}") from None
    finally:
        os.close(fd)


def vhost_net_available(path: str = VHOST_NET_DEVICE) -> bool:
    try:
        vhost_net_features(path)
    except VhostNetUnavailable:
        return False
    return True


def require_vhost_net(path: str = VHOST_NET_DEVICE) -> None:
    """Raise VhostNetUnavailable (one line, for the user) unless vhost-net can be used."""
    vhost_net_features(path)
