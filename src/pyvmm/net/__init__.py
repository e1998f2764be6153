"""Host-side networking for guests: TAP devices, their network namespace, the vhost-net check.

    tap.py      open_tap() -> Tap (a virtio-net back-end), FdBackend for any frame fd
    netns.py    HostNetwork: namespace + TAP + addresses, torn down on close
    vhost.py    vhost_net_available(), require_vhost_net(), VhostNetUnavailable
"""

from .netns import HostNetwork, HostNetworkError, call_in_netns
from .tap import FdBackend, Tap, TapError, open_tap
from .vhost import VhostNetUnavailable, require_vhost_net, vhost_net_available

__all__ = ["FdBackend", "HostNetwork", "HostNetworkError", "Tap", "TapError", "VhostNetUnavailable",
           "call_in_netns", "open_tap", "require_vhost_net", "vhost_net_available"]
