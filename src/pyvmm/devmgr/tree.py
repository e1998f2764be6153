"""The device tree: one node per device, with what was allocated to it.

A node records a device's id (unique in the machine, e.g. "com1", "virtio-blk0"), its kind
("uart16550", "virtio-blk"), its transport ("pio", "virtio-mmio", "virtio-pci"...), its
parent's id (a virtio-pci device hangs under the PCI root) and its resources: port ranges,
MMIO windows, GSIs, a PCI slot, a virtio-mmio slot. The tree is plain data: it saves to a
typed, versioned state (persist.State) and its JSON form, and a tree restored from that
form replays the same allocation (devmgr.manager).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..persist import State, StateError

PCI_SLOTS = 32           # slots on the root bus (0 is the host bridge)


@dataclass(frozen=True)
class Resources(State):
    """What one device was given. Ranges are (base, length)."""

    KIND = "device-resources"
    VERSION = 1

    ports: tuple[tuple[int, int], ...] = ()
    mmio: tuple[tuple[int, int], ...] = ()
    gsis: tuple[int, ...] = ()
    pci_slot: int | None = None
    mmio_slot: int | None = None    # index into the platform's virtio-mmio windows (layout)

    def validate(self) -> None:
        for field, limit in (("ports", 1 << 16), ("mmio", 1 << 64)):
            for i, (base, length) in enumerate(getattr(self, field)):
                if length <= 0 or base < 0 or base + length > limit:
                    self.fail(f"{field}[{i}]", f"range {base:#x}+{length:#x} is outside 0..{limit:#x}")
        self.check_items("gsis", 0, 1023)
        if self.pci_slot is not None and not 0 <= self.pci_slot < PCI_SLOTS:
            self.fail("pci_slot", f"{self.pci_slot} is outside 0..{PCI_SLOTS - 1}")
        if self.mmio_slot is not None and self.mmio_slot < 0:
            self.fail("mmio_slot", f"{self.mmio_slot} is negative")

    def describe(self) -> str:
        parts = [f"ports {b:#x}-{b + n - 1:#x}" for b, n in self.ports]
        parts += [f"mmio {b:#x}-{b + n - 1:#x}" for b, n in self.mmio]
        parts += [f"GSI {gsi}" for gsi in self.gsis]
        if self.pci_slot is not None:
            parts.append(f"PCI slot {self.pci_slot}")
        return ", ".join(parts) or "no resources"


@dataclass(frozen=True)
class DeviceNode(State):
    KIND = "device-node"
    VERSION = 1

    id: str
    kind: str
    transport: str              # how the guest reaches it: pio, mmio, virtio-mmio, virtio-pci, pci, none
    parent: str | None = None
    resources: Resources = Resources()

    def validate(self) -> None:
        if not self.id or not self.kind:
            self.fail("id" if not self.id else "kind", "must not be empty")


@dataclass(frozen=True)
class DeviceTreeState(State):
    KIND = "device-tree"
    VERSION = 1

    nodes: tuple[DeviceNode, ...] = ()

    def validate(self) -> None:
        seen: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.id in seen:
                self.fail(f"nodes[{i}].id", f"{node.id!r} appears twice")
            if node.parent is not None and node.parent not in seen:
                self.fail(f"nodes[{i}].parent", f"{node.parent!r} is not an earlier node")
            seen.add(node.id)


class DeviceTree:
    """The nodes in the order they were added (parents before children)."""

    def __init__(self, nodes: tuple[DeviceNode, ...] = ()) -> None:
        self._nodes: dict[str, DeviceNode] = {}
        for node in DeviceTreeState(tuple(nodes)).nodes:  # checks ids and parents
            self._nodes[node.id] = node

    def __iter__(self) -> Iterator[DeviceNode]:
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def get(self, node_id: str) -> DeviceNode | None:
        return self._nodes.get(node_id)

    def children(self, node_id: str) -> list[DeviceNode]:
        return [node for node in self._nodes.values() if node.parent == node_id]

    def add(self, node: DeviceNode) -> None:
        if node.id in self._nodes:
            raise StateError(f"device tree: a device with id {node.id!r} exists already")
        if node.parent is not None and node.parent not in self._nodes:
            raise StateError(f"device tree: {node.id!r}: no parent device {node.parent!r}")
        self._nodes[node.id] = node

    def remove(self, node_id: str) -> DeviceNode:
        if node_id not in self._nodes:
            raise StateError(f"device tree: no device {node_id!r}")
        if self.children(node_id):
            raise StateError(f"device tree: {node_id!r} still has devices under it "
                             f"({', '.join(n.id for n in self.children(node_id))})")
        return self._nodes.pop(node_id)

    # --- Persist -------------------------------------------------------------------------

    def save(self) -> DeviceTreeState:
        return DeviceTreeState(tuple(self._nodes.values()))

    def restore(self, state: DeviceTreeState) -> None:
        """Replace the nodes with the state's (a DeviceTreeState is checked when it is made)."""
        self._nodes = {node.id: node for node in state.nodes}

    @classmethod
    def from_state(cls, state: DeviceTreeState) -> "DeviceTree":
        return cls(state.nodes)

    def to_dict(self) -> dict:
        return self.save().to_dict()

    @classmethod
    def from_dict(cls, data: object) -> "DeviceTree":
        return cls.from_state(DeviceTreeState.from_dict(data))
