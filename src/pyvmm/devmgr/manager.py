"""The device manager: the one place that hands out I/O ports, MMIO windows, GSIs and PCI
slots, and records what each device got in the device tree.

A device asks with a `Request`: fixed resources (a legacy device's ports and IRQ, from the
layout module), a window in one of the platform's virtio-mmio slots (its GSI comes with the
slot), or a slot on the PCI root bus. Fresh allocation is deterministic: the lowest free
slot, in the order devices are added.

Built from a recorded tree (a snapshot, a migration stream), the manager reserves every
recorded node's resources up front; adding a device with a recorded id then gives it exactly
what it had, whatever the order, and a device that is not in the record gets what is left.
A conflict (an id used twice, a slot or port range held by another device, no slot left, a
recorded node that does not fit the request) is an AllocationError naming both devices.
Removing a device frees its resources for the next one (hotplug).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..arch.x86_64 import layout
from ..errors import UserError
from .tree import DeviceNode, DeviceTree, Resources


class AllocationError(UserError):
    """A device cannot get the resources it asks for; the message names the devices."""


@dataclass(frozen=True)
class Request:
    """What a device asks for. Fixed ranges are (base, length)."""
    ports: tuple[tuple[int, int], ...] = ()
    mmio: tuple[tuple[int, int], ...] = ()
    gsis: tuple[int, ...] = ()          # exclusive GSIs (edge-triggered ISA IRQs)
    mmio_window: int = 0                # > 0: a window of this length in a virtio-mmio slot, and its GSI
    pci_slot: bool = False              # a slot on the PCI root bus


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class DeviceManager:
    def __init__(self, recorded: DeviceTree | None = None, *,
                 mmio_slots: tuple[tuple[int, int], ...] = layout.VIRTIO_MMIO_SLOT_TABLE,
                 pci_slots: range = layout.PCI_DEVICE_SLOTS) -> None:
        """`mmio_slots`: (base, GSI) of each virtio-mmio slot; `pci_slots`: the root bus slots
        devices may take. `recorded`: a tree whose allocation this one replays."""
        self.tree = DeviceTree()
        self._mmio_slots = tuple(mmio_slots)
        self._pci_slots = pci_slots
        self._objects: dict[str, object] = {}
        self._transports: dict[str, object] = {}
        # What is taken, and by whom (a recorded node's id holds its resources until it is added).
        self._ports: list[tuple[tuple[int, int], str]] = []
        self._mmio: list[tuple[tuple[int, int], str]] = []
        self._gsis: dict[int, str] = {}
        self._pci: dict[int, str] = {}
        self._mmio_slot_owner: dict[int, str] = {}
        self._recorded: dict[str, DeviceNode] = {}
        for node in (recorded or ()):
            self._claim(node.id, node.resources)
            self._recorded[node.id] = node

    # --- allocation --------------------------------------------------------------------------

    def add(self, node_id: str, kind: str, request: Request = Request(), *, transport: str,
            parent: str | None = None, device: object = None) -> DeviceNode:
        """Allocate what `request` asks for to a new device and record its node."""
        if node_id in self.tree:
            raise AllocationError(f"a device with id {node_id!r} exists already")
        if parent is not None and parent not in self.tree:
            raise AllocationError(f"{node_id}: no parent device {parent!r}")
        recorded = self._recorded.pop(node_id, None)
        if recorded is not None:
            node = DeviceNode(node_id, kind, transport, parent, recorded.resources)
            try:
                self._check_replay(recorded, node, request)
            except AllocationError:
                self._recorded[node_id] = recorded
                raise
        else:
            node = DeviceNode(node_id, kind, transport, parent, self._fresh(node_id, request))
            self._claim(node_id, node.resources)
        self.tree.add(node)
        if device is not None:
            self._objects[node_id] = device
        return node

    def attach(self, node_id: str, device: object, transport: object = None) -> None:
        """The live objects behind a node: the device model (or root complex) and, for a
        virtio device, its transport."""
        if node_id not in self.tree:
            raise AllocationError(f"no device {node_id!r}")
        self._objects[node_id] = device
        if transport is not None:
            self._transports[node_id] = transport

    def remove(self, node_id: str) -> DeviceNode:
        """Take a device out of the tree and free its resources (it must have no children)."""
        if node_id not in self.tree:
            raise AllocationError(f"no device {node_id!r}")
        if self.tree.children(node_id):
            raise AllocationError(f"{node_id}: remove the devices under it first "
                                  f"({', '.join(n.id for n in self.tree.children(node_id))})")
        node = self.tree.remove(node_id)
        self._release(node_id)
        self._objects.pop(node_id, None)
        self._transports.pop(node_id, None)
        return node

    def device(self, node_id: str) -> object:
        return self._objects[node_id]

    def transport(self, node_id: str) -> object | None:
        return self._transports.get(node_id)

    def devices(self) -> dict[str, object]:
        """Every device's live object by id, in the tree's order."""
        return {node.id: self._objects[node.id] for node in self.tree if node.id in self._objects}

    def unclaimed(self) -> list[str]:
        """Recorded nodes no device has been added for (a restore that left something out)."""
        return list(self._recorded)

    # --- internals -----------------------------------------------------------------------------

    def _fresh(self, node_id: str, request: Request) -> Resources:
        mmio, gsis = request.mmio, request.gsis
        mmio_slot = pci_slot = None
        if request.mmio_window:
            free = [i for i in range(len(self._mmio_slots)) if i not in self._mmio_slot_owner]
            if not free:
                raise AllocationError(f"{node_id}: at most {len(self._mmio_slots)} virtio-mmio devices "
                                      "(use transport=pci)")
            mmio_slot = free[0]
            base, gsi = self._mmio_slots[mmio_slot]
            mmio, gsis = mmio + ((base, request.mmio_window),), gsis + (gsi,)
        if request.pci_slot:
            free = [slot for slot in self._pci_slots if slot not in self._pci]
            if not free:
                raise AllocationError(f"{node_id}: no free PCI slot (the root bus holds {len(self._pci_slots)} devices)")
            pci_slot = free[0]
        return Resources(ports=request.ports, mmio=mmio, gsis=gsis, pci_slot=pci_slot, mmio_slot=mmio_slot)

    def _check_replay(self, recorded: DeviceNode, node: DeviceNode, request: Request) -> None:
        """The recorded node must be the same device, and its resources what the request asks for."""
        where = f"{node.id}: the recorded device"
        for what in ("kind", "transport", "parent"):
            if getattr(recorded, what) != getattr(node, what):
                raise AllocationError(f"{where} has {what} {getattr(recorded, what)!r}, not {getattr(node, what)!r}")
        res = recorded.resources
        expected_mmio, expected_gsis = request.mmio, request.gsis
        if request.mmio_window:
            if res.mmio_slot is None or res.mmio_slot >= len(self._mmio_slots):
                raise AllocationError(f"{where} has no virtio-mmio slot of this machine")
            base, gsi = self._mmio_slots[res.mmio_slot]
            expected_mmio, expected_gsis = expected_mmio + ((base, request.mmio_window),), expected_gsis + (gsi,)
        elif res.mmio_slot is not None:
            raise AllocationError(f"{where} has a virtio-mmio slot it does not ask for")
        if request.pci_slot != (res.pci_slot is not None):
            raise AllocationError(f"{where} {'has no' if request.pci_slot else 'has a'} PCI slot")
        if res.pci_slot is not None and res.pci_slot not in self._pci_slots:
            raise AllocationError(f"{where} has PCI slot {res.pci_slot}, which devices cannot take")
        if (res.ports, res.mmio, res.gsis) != (request.ports, expected_mmio, expected_gsis):
            raise AllocationError(f"{where} has {res.describe()}, this machine gives it "
                                  f"{replace(res, ports=request.ports, mmio=expected_mmio, gsis=expected_gsis).describe()}")

    def _claim(self, owner: str, res: Resources) -> None:
        """Mark `res` taken by `owner`, all or nothing."""
        for rng in res.ports:
            for taken, holder in self._ports:
                if _overlaps(rng, taken):
                    raise AllocationError(f"{owner}: ports {rng[0]:#x}-{rng[0] + rng[1] - 1:#x} overlap {holder}'s")
        for rng in res.mmio:
            for taken, holder in self._mmio:
                if _overlaps(rng, taken):
                    raise AllocationError(f"{owner}: MMIO {rng[0]:#x}-{rng[0] + rng[1] - 1:#x} overlaps {holder}'s")
        for gsi in res.gsis:
            if gsi in self._gsis:
                raise AllocationError(f"{owner}: GSI {gsi} is taken by {self._gsis[gsi]}")
        if len(set(res.gsis)) != len(res.gsis):
            raise AllocationError(f"{owner}: a GSI appears twice")
        if res.pci_slot is not None and res.pci_slot in self._pci:
            raise AllocationError(f"{owner}: PCI slot {res.pci_slot} is taken by {self._pci[res.pci_slot]}")
        if res.mmio_slot is not None and res.mmio_slot in self._mmio_slot_owner:
            raise AllocationError(f"{owner}: virtio-mmio slot {res.mmio_slot} is taken by "
                                  f"{self._mmio_slot_owner[res.mmio_slot]}")
        self._ports += [(rng, owner) for rng in res.ports]
        self._mmio += [(rng, owner) for rng in res.mmio]
        self._gsis.update((gsi, owner) for gsi in res.gsis)
        if res.pci_slot is not None:
            self._pci[res.pci_slot] = owner
        if res.mmio_slot is not None:
            self._mmio_slot_owner[res.mmio_slot] = owner

    def _release(self, owner: str) -> None:
        self._ports = [(rng, holder) for rng, holder in self._ports if holder != owner]
        self._mmio = [(rng, holder) for rng, holder in self._mmio if holder != owner]
        for table in (self._gsis, self._pci, self._mmio_slot_owner):
            for key in [key for key, holder in table.items() if holder == owner]:
                del table[key]
