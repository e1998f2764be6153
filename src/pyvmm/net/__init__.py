"""Host-side networking for guests: TAP devices, their network namespace, the vhost-net check.

    tap.py      open_tap() -> Tap (a virtio-net back-end), FdBackend for any frame fd
    netns.py    HostNetwork: namespace + TAP + addresses, torn down on close
    vhost.py    vhost_net_available(), require_vhost_net(), VhostNetUnavailable
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .netns import HostNetwork, HostNetworkError, call_in_netns
    from .tap import FdBackend, Tap, TapError, open_tap
    from .vhost import VhostNetUnavailable, require_vhost_net, vhost_net_available

# loaded at first use (lazy_exports.py): the seccomp allowlist imports tap and vhost for their
# ioctl numbers in every VM, netns (subprocess) only serves tap=auto
_SOURCES = {"HostNetwork": "netns", "HostNetworkError": "netns", "call_in_netns": "netns",
            "FdBackend": "tap", "Tap": "tap", "TapError": "tap", "open_tap": "tap",
            "VhostNetUnavailable": "vhost", "require_vhost_net": "vhost", "vhost_net_available": "vhost"}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
