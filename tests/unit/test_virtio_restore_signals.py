"""An interrupt a device raises while it is being restored reaches the driver (virtio-pci with
MSI-X or INTx, virtio-mmio). A transport that restored its vectors and interrupt status after
the device overwrote it, while the used ring said the driver was told: with EVENT_IDX that queue
never interrupted again (a restored Linux guest's vsock receive queue went silent)."""

import struct
from types import SimpleNamespace

import pytest

from helpers.state import through_json
from helpers.virtio_driver import BumpAllocator, DriverQueue
from pyvmm import restore as restore_module
from pyvmm.devices.virtio import mmio as M
from pyvmm.devices.virtio import pci as P
from pyvmm.devices.virtio.device import STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, VirtioDevice
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from test_virtio_pci import PROBE_STATUS, RAM, Line, LinuxDriver, Machine


class ServesOnRestore(VirtioDevice):
    """Completes the buffers waiting on its queue as its restore ends, as virtio-vsock's does
    (an RST for each connection whose host end is gone)."""
    device_id = 4

    def __init__(self):
        super().__init__((8,))

    def process_queue(self, queue_index):
        queue = self.queues[queue_index]
        while (chain := queue.pop()) is not None:
            queue.push(chain, 0)
        self.signal_used(queue_index)

    def restore(self, state):
        super().restore(state)
        with self.lock:
            if self.queue_usable(0):
                self.process_queue(0)


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, RAM)]) as memory:
        yield memory


@pytest.mark.parametrize("msix", [True, False], ids=["msix", "intx"])
def test_pci(memory, msix):
    m = Machine(memory, ServesOnRestore())
    q = LinuxDriver(m).probe(msix=msix)
    head = q.add([], [4])                                       # saved before the device saw it
    state = through_json(m.transport.save())
    other = Machine(memory, ServesOnRestore())
    other.transport.restore(state)
    assert q.take_used() == [(head, 0)]
    if msix:
        assert other.sent() == [0, 1]                           # the queue's vector
    else:
        assert other.line.level and LinuxDriver(other).read_isr() == P.ISR_QUEUE


def test_mmio(memory):
    t = M.VirtioMmioTransport(ServesOnRestore(), Line(), memory)
    t.irq.trigger = lambda: None

    def wr(offset, value):
        t.write(offset, struct.pack("<I", value))

    wr(M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    wr(M.DRIVER_FEATURES_SEL, 1)
    wr(M.DRIVER_FEATURES, 1)
    wr(M.STATUS, PROBE_STATUS)
    q = DriverQueue(memory, BumpAllocator(0x10000, RAM), 8)
    wr(M.QUEUE_NUM, 8)
    for low, address in ((M.QUEUE_DESC_LOW, q.desc_table), (M.QUEUE_DRIVER_LOW, q.avail_ring),
                         (M.QUEUE_DEVICE_LOW, q.used_ring)):
        wr(low, address)
    wr(M.QUEUE_READY, 1)
    wr(M.STATUS, PROBE_STATUS | STATUS_DRIVER_OK)
    head = q.add([], [4])
    state = through_json(t.save())
    other = M.VirtioMmioTransport(ServesOnRestore(), Line(), memory)
    edges = []
    other.irq.trigger = lambda: edges.append(other.interrupt_status)
    other.restore(state)
    assert q.take_used() == [(head, 0)]
    assert edges == [M.INT_USED_BUFFER] and other.interrupt_status == M.INT_USED_BUFFER


def test_a_vm_restore_loads_the_vcpus_before_the_devices(monkeypatch):
    """On KVM a vCPU's restore loads its LAPIC page: after the devices, it dropped an MSI a
    device's restore had just sent (pending in the LAPIC's IRR)."""
    irr: set[int] = set()

    class Vcpu:
        def restore(self, saved_irr):
            irr.clear()
            irr.update(saved_irr)

    def restore_devices(manager, states):
        irr.add(0x41)                                           # vsock's RST on the rx queue's vector

    monkeypatch.setattr(restore_module, "restore_devices", restore_devices)
    manager = SimpleNamespace(tree=_Tree(), device=lambda node_id: None)
    vm = SimpleNamespace(device_manager=manager, accel=SimpleNamespace(name="kvm", restore=lambda platform: None),
                         vcpus=[Vcpu()], start=lambda: None, devices={}, iothread=SimpleNamespace(call_soon=print))
    state = SimpleNamespace(device_tree=NO_NODES, accelerator="kvm", platform=None, devices={}, vcpus=[{0x30}])
    restore_module.finish_restore(vm, state)
    assert irr == {0x30, 0x41}


NO_NODES = SimpleNamespace(nodes=())


class _Tree(list):
    """A device tree with no nodes, saved as the state says."""

    def save(self):
        return NO_NODES
