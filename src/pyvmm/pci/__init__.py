"""PCI: configuration space, BARs, MSI-X and the root complex (host bridge, conf1, ECAM)."""

from .config import Bar, BarKind, PciConfigSpace, PciError
from .device import PciBarRegion, PciDevice
from .msix import MsiVector, MsiVectorFactory, MsixCapability
from .root import PciHostBridge, PciIntxLine, PciRoot

__all__ = [
    "Bar", "BarKind", "MsiVector", "MsiVectorFactory", "MsixCapability", "PciBarRegion", "PciConfigSpace",
    "PciDevice", "PciError", "PciHostBridge", "PciIntxLine", "PciRoot",
]
