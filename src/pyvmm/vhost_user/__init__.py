"""vhost-user: hand a virtio device's rings to another process over a Unix socket.

    protocol.py   the wire format: messages, payloads, SCM_RIGHTS fd passing, errors
    frontend.py   VhostUserFrontend: one connection (features, memory table, rings, config)

Device models that use it live with the other virtio devices (devices/virtio/vhost_user_blk.py).
"""

from .frontend import VhostUserFrontend
from .protocol import (
    ProtocolFeature, Request, VhostUserDisconnected, VhostUserError, VhostUserProtocolError, VhostUserTimeout,
)

__all__ = ["ProtocolFeature", "Request", "VhostUserDisconnected", "VhostUserError", "VhostUserFrontend",
           "VhostUserProtocolError", "VhostUserTimeout"]
