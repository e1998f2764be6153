"""The device manager and its tree (src/pyvmm/devmgr): deterministic allocation, replay from a
saved tree, conflicts, removal."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64 import layout
from pyvmm.devmgr import AllocationError, DeviceManager, DeviceNode, DeviceTree, Request, Resources
from pyvmm.errors import UserError
from pyvmm.persist import StateError

COM1 = Request(ports=((layout.COM1_PORT, layout.COM1_PORT_COUNT),), gsis=(layout.COM1_IRQ,))
MMIO = Request(mmio_window=0x200)
PCI = Request(pci_slot=True)


def machine(manager: DeviceManager, devices: list[tuple[str, str]]) -> dict[str, Resources]:
    """Add a PCI root, COM1 and `devices` ((id, 'mmio'|'pci')); the resources each got."""
    manager.add("pci", "pci-root", Request(ports=((layout.PCI_CONF1_PORT, layout.PCI_CONF1_PORT_COUNT),)),
                transport="platform")
    manager.add("com1", "uart16550", COM1, transport="pio")
    for node_id, transport in devices:
        if transport == "mmio":
            manager.add(node_id, "virtio-blk", MMIO, transport="virtio-mmio")
        else:
            manager.add(node_id, "virtio-blk", PCI, transport="virtio-pci", parent="pci")
    return {node.id: node.resources for node in manager.tree}


def test_fresh_allocation_is_deterministic_and_takes_the_lowest_free_slot():
    devices = [("a", "mmio"), ("b", "pci"), ("c", "mmio"), ("d", "pci")]
    first = machine(DeviceManager(), devices)
    assert first == machine(DeviceManager(), devices)
    assert first["a"].mmio_slot == 0 and first["c"].mmio_slot == 1
    assert first["a"].mmio == ((layout.VIRTIO_MMIO_BASE, 0x200),)
    assert first["c"].mmio == ((layout.VIRTIO_MMIO_BASE + layout.VIRTIO_MMIO_STRIDE, 0x200),)
    assert first["a"].gsis == (layout.VIRTIO_MMIO_GSIS[0],) and first["c"].gsis == (layout.VIRTIO_MMIO_GSIS[1],)
    assert (first["b"].pci_slot, first["d"].pci_slot) == (1, 2)
    assert first["com1"].ports == ((0x3F8, 8),) and first["com1"].gsis == (4,)


def test_replay_from_a_saved_tree_gives_identical_resources_in_any_order():
    original = DeviceManager()
    machine(original, [("a", "mmio"), ("b", "pci"), ("c", "mmio"), ("d", "pci")])
    original.remove("a")    # holes: the next fresh device would take them
    original.remove("b")
    machine_nodes = {node.id: node for node in original.tree}
    saved = json.loads(json.dumps(original.tree.to_dict()))

    replayed = DeviceManager(DeviceTree.from_dict(saved))
    assert sorted(replayed.unclaimed()) == sorted(machine_nodes)
    # another order, and a new device added before the recorded ones: it must not take their slots
    replayed.add("pci", "pci-root", Request(ports=((layout.PCI_CONF1_PORT, layout.PCI_CONF1_PORT_COUNT),)),
                 transport="platform")
    new = replayed.add("new", "virtio-rng", PCI, transport="virtio-pci", parent="pci")
    replayed.add("d", "virtio-blk", PCI, transport="virtio-pci", parent="pci")
    replayed.add("c", "virtio-blk", MMIO, transport="virtio-mmio")
    replayed.add("com1", "uart16550", COM1, transport="pio")
    assert replayed.unclaimed() == []
    for node_id, node in machine_nodes.items():
        assert replayed.tree.get(node_id) == node
    assert new.resources.pci_slot == 1        # freed by b, not d's 2
    assert replayed.tree.get("c").resources.mmio_slot == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["mmio", "pci"]), max_size=10), st.data())
def test_replay_property(transports, data):
    devices = [(f"dev{i}", t) for i, t in enumerate(transports)]
    original = DeviceManager()
    machine(original, devices)
    for node_id, _ in data.draw(st.lists(st.sampled_from(devices), unique=True)) if devices else []:
        original.remove(node_id)
    state = original.tree.save()
    replayed = DeviceManager(DeviceTree.from_state(type(state).from_dict(json.loads(json.dumps(state.to_dict())))))
    nodes = list(original.tree)
    for node in nodes[:1] + nodes[:0:-1]:  # the PCI root first (a parent), the rest backwards
        replayed.add(node.id, node.kind, _request_for(node), transport=node.transport, parent=node.parent)
    assert {node.id: node for node in replayed.tree} == {node.id: node for node in state.nodes}


def _request_for(node: DeviceNode) -> Request:
    res = node.resources
    if res.mmio_slot is not None:
        return MMIO
    if res.pci_slot is not None:
        return PCI
    return Request(ports=res.ports, mmio=res.mmio, gsis=res.gsis)


def test_duplicate_id_is_a_clear_error():
    manager = DeviceManager()
    manager.add("com1", "uart16550", COM1, transport="pio")
    with pytest.raises(AllocationError, match="'com1' exists already"):
        manager.add("com1", "uart16550", Request(), transport="pio")
    assert issubclass(AllocationError, UserError)


@pytest.mark.parametrize("second, message", [
    (Request(ports=((0x3FC, 2),)), "ports 0x3fc-0x3fd overlap com1's"),
    (Request(gsis=(4,)), "GSI 4 is taken by com1"),
])
def test_busy_resources_are_a_clear_error(second, message):
    manager = DeviceManager()
    manager.add("com1", "uart16550", COM1, transport="pio")
    with pytest.raises(AllocationError, match=message):
        manager.add("other", "thing", second, transport="pio")
    assert "other" not in manager.tree          # nothing half-allocated
    manager.add("other", "thing", Request(ports=((0x2F8, 8),)), transport="pio")


def test_a_recorded_slot_that_is_busy_is_a_clear_error():
    tree = DeviceTree((DeviceNode("a", "virtio-blk", "virtio-pci", None, Resources(pci_slot=3)),
                       DeviceNode("b", "virtio-blk", "virtio-pci", None, Resources(pci_slot=3))))
    with pytest.raises(AllocationError, match="PCI slot 3 is taken by a"):
        DeviceManager(tree)


def test_a_recorded_node_that_does_not_fit_is_refused():
    manager = DeviceManager(DeviceTree((DeviceNode("com1", "uart16550", "pio", None,
                                                   Resources(ports=((0x2F8, 8),), gsis=(3,))),)))
    with pytest.raises(AllocationError, match="recorded device has ports 0x2f8-0x2ff"):
        manager.add("com1", "uart16550", COM1, transport="pio")
    with pytest.raises(AllocationError, match="kind 'uart16550', not 'i8042'"):
        manager.add("com1", "i8042", COM1, transport="pio")
    assert manager.unclaimed() == ["com1"]


def test_slots_run_out_with_a_hint():
    manager = DeviceManager()
    for i in range(layout.VIRTIO_MMIO_SLOTS):
        manager.add(f"m{i}", "virtio-rng", MMIO, transport="virtio-mmio")
    with pytest.raises(AllocationError, match="use transport=pci"):
        manager.add("one-more", "virtio-rng", MMIO, transport="virtio-mmio")
    manager.add("pci", "pci-root", Request(), transport="platform")
    for i in range(31):
        manager.add(f"p{i}", "virtio-rng", PCI, transport="virtio-pci", parent="pci")
    with pytest.raises(AllocationError, match="no free PCI slot"):
        manager.add("p-more", "virtio-rng", PCI, transport="virtio-pci", parent="pci")


def test_removal_frees_resources_and_refuses_a_parent_with_children():
    manager = DeviceManager()
    machine(manager, [("a", "mmio"), ("b", "pci")])
    with pytest.raises(AllocationError, match="remove the devices under it first \\(b\\)"):
        manager.remove("pci")
    freed = manager.remove("a")
    again = manager.add("a2", "virtio-blk", MMIO, transport="virtio-mmio")
    assert again.resources == freed.resources
    manager.remove("com1")
    manager.add("com1-again", "uart16550", COM1, transport="pio")
    with pytest.raises(AllocationError, match="no device 'zzz'"):
        manager.remove("zzz")


def test_devices_keep_their_live_objects_in_tree_order():
    manager = DeviceManager()
    first, second = object(), object()
    manager.add("x", "thing", Request(ports=((0x80, 1),)), transport="pio", device=first)
    manager.add("y", "thing", Request(), transport="none")
    manager.attach("y", second)
    assert list(manager.devices().items()) == [("x", first), ("y", second)]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["fields"]["nodes"].append(d["fields"]["nodes"][0]), "appears twice"),
    (lambda d: d["fields"]["nodes"][0]["fields"].pop("kind"), "missing field kind"),
    (lambda d: d["fields"]["nodes"][0]["fields"]["resources"]["fields"].update(pci_slot=40), "pci_slot"),
    (lambda d: d["fields"]["nodes"][0]["fields"].update(parent="nobody"), "not an earlier node"),
    (lambda d: d.update(version=99), "version 99"),
])
def test_a_broken_saved_tree_is_refused(mutate, message):
    manager = DeviceManager()
    manager.add("a", "virtio-blk", MMIO, transport="virtio-mmio")
    data = json.loads(json.dumps(manager.tree.to_dict()))
    mutate(data)
    with pytest.raises(StateError, match=message):
        DeviceTree.from_dict(data)


def test_the_tree_saves_and_restores_through_json():
    manager = DeviceManager()
    machine(manager, [("a", "mmio"), ("b", "pci")])
    state = manager.tree.save()
    again = DeviceTree()
    again.restore(type(state).from_dict(json.loads(json.dumps(state.to_dict()))))
    assert again.save() == state and [n.id for n in again] == [n.id for n in manager.tree]
    assert again.children("pci") == [manager.tree.get("b")]
