"""Virtio devices: split virtqueues, the transport-independent device base, the transports.

    queue.py     SplitQueue, DescriptorChain (the guest's rings, validated)
    blk.py, blk_image.py   virtio-blk: requests; the image file (open, lock, fallocate)
    device.py    VirtioDevice (features, config space, lifecycle, locking)
    mmio.py      virtio-mmio transport
    rng.py ...   one module per device type
"""

from .device import VirtioDevice
from .queue import DescriptorChain, SplitQueue, VirtqueueBroken

__all__ = ["DescriptorChain", "SplitQueue", "VirtioDevice", "VirtqueueBroken"]
