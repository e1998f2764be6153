"""The host side of devices: Unix-socket servers and connectors, streams on the I/O thread.

Device models (pyvmm.devices) see only the protocols in devices/virtio/host_side.py; the
builder makes these objects and passes them in.
"""

from .streams import SocketStream, listen_unix
from .console import UnixPortListener
from .vsock import VsockUnixHost

__all__ = ["SocketStream", "UnixPortListener", "VsockUnixHost", "listen_unix"]
