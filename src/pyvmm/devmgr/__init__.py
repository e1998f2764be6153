"""The device manager: allocates ports, MMIO windows, GSIs and PCI slots and keeps the device
tree (a node per device: kind, id, resources, transport, parent) that restore, migration,
hotplug and the control plane read. See manager.py and tree.py."""

from .manager import AllocationError, DeviceManager, Request
from .tree import DeviceNode, DeviceTree, DeviceTreeState, Resources

__all__ = ["AllocationError", "DeviceManager", "DeviceNode", "DeviceTree", "DeviceTreeState", "Request", "Resources"]
