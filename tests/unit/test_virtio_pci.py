"""virtio-pci modern transport (src/pyvmm/devices/virtio/pci.py), driven the way Linux's
virtio_pci_modern does it: through ECAM config space and BAR accesses on the MMIO bus of a
real PciRoot, with virtio-rng behind it."""

import struct
from types import SimpleNamespace

import pytest

from helpers.state import changed, through_json
from pyvmm.persist import StateError
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.virtio_driver import BumpAllocator, DriverQueue
from pyvmm.arch.x86_64 import layout
from pyvmm.bus import MmioBus, PioBus
from pyvmm.devices.virtio import mmio as M
from pyvmm.devices.virtio import pci as P
from pyvmm.devices.virtio.device import (
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1, VirtioDevice,
)
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.pci import PciRoot
from pyvmm.pci import config as cfg
from pyvmm.pci import msix as mx

ECAM = layout.PCI_ECAM_BASE
MMIO32 = (layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE)
MMIO64 = (0x1_0000_0000, 64 << 30)
RAM = 1 << 20
MSI_ADDRESS = 0xFEE0_0000
PROBE_STATUS = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK


class Line:
    def __init__(self):
        self.levels = []

    def set_level(self, high):
        self.levels.append(high)

    def trigger(self):
        raise AssertionError("PCI INTx is level-triggered")

    @property
    def level(self):
        return bool(self.levels) and self.levels[-1]


class FakeMsiVector:
    def __init__(self, index):
        self.index = index
        self.eventfd = 100 + index
        self.state = None
        self.sent = 0

    def configure(self, address, data, masked):
        self.state = (address, data, masked)

    def trigger(self):
        self.sent += 1

    def close(self):
        pass


class Machine:
    """Buses, a PCI root and one virtio-pci transport in a slot, plus guest RAM."""

    def __init__(self, memory, device=None, *, connect_msi=True):
        self.memory = memory
        self.pio, self.mmio = PioBus(), MmioBus()
        self.lines = {}
        self.vectors = []
        self.root = PciRoot(self.pio, self.mmio, ecam_base=ECAM, mmio32_window=MMIO32, mmio64_window=MMIO64,
                            irq_line=lambda gsi: self.lines.setdefault(gsi, Line()))
        self.device = device or VirtioRng(source=lambda n: b"\xab" * n)
        self.transport = P.VirtioPciTransport(self.device, memory,
                                              msi_vector=self._vector if connect_msi else None)
        self.slot = self.root.add_device(self.transport, name="rng0")
        self.line = self.lines[self.root.intx_gsi(self.slot, cfg.INTA)]

    def _vector(self):
        vector = FakeMsiVector(len(self.vectors))
        self.vectors.append(vector)
        return vector

    def sent(self):
        return [v.sent for v in self.vectors]


class LinuxDriver:
    """What drivers/virtio/virtio_pci_modern{,_dev}.c do, over ECAM and the MMIO bus."""

    def __init__(self, machine):
        self.m = machine
        self.mmio = machine.mmio
        self.slot = machine.slot
        self.caps = {}          # cfg_type -> (config offset, bar, offset, length)
        self.msix_cap = None
        self.walk_capabilities()
        self.bar_base = self.read_bar(P.VIRTIO_BAR)

    # config space
    def cfg_read(self, offset, size):
        return int.from_bytes(self.mmio.read(ECAM + (self.slot << 15 | offset), size), "little")

    def cfg_write(self, offset, size, value):
        self.mmio.write(ECAM + (self.slot << 15 | offset), value.to_bytes(size, "little"))

    def walk_capabilities(self):
        assert self.cfg_read(cfg.STATUS, 2) & cfg.STATUS_CAP_LIST
        pointer, seen = self.cfg_read(cfg.CAPABILITIES_POINTER, 1), 0
        while pointer:
            seen += 1
            assert seen < 48, "capability list loops"
            cap_id, following = self.cfg_read(pointer, 1), self.cfg_read(pointer + 1, 1)
            if cap_id == cfg.CAP_ID_VENDOR:
                cfg_type = self.cfg_read(pointer + P.CAP_CFG_TYPE, 1)
                self.caps.setdefault(cfg_type, (pointer, self.cfg_read(pointer + P.CAP_BAR, 1),
                                                self.cfg_read(pointer + P.CAP_OFFSET, 4),
                                                self.cfg_read(pointer + P.CAP_LENGTH, 4)))
            elif cap_id == cfg.CAP_ID_MSIX:
                self.msix_cap = pointer
            pointer = following

    def read_bar(self, index):
        low = self.cfg_read(cfg.BAR0 + 4 * index, 4)
        address = low & ~0xF
        if low & cfg.BAR_MEM_TYPE_64:
            address |= self.cfg_read(cfg.BAR0 + 4 * index + 4, 4) << 32
        return address

    def size_bar(self, index):
        """The sizing dance with decode off, as __pci_read_base does; returns (size, flags)."""
        command = self.cfg_read(cfg.COMMAND, 2)
        self.cfg_write(cfg.COMMAND, 2, command & ~cfg.COMMAND_MEMORY)
        offset = cfg.BAR0 + 4 * index
        saved = self.cfg_read(offset, 4), self.cfg_read(offset + 4, 4)
        self.cfg_write(offset, 4, 0xFFFFFFFF)
        self.cfg_write(offset + 4, 4, 0xFFFFFFFF)
        low, high = self.cfg_read(offset, 4), self.cfg_read(offset + 4, 4)
        self.cfg_write(offset, 4, saved[0])
        self.cfg_write(offset + 4, 4, saved[1])
        self.cfg_write(cfg.COMMAND, 2, command)
        mask = (high << 32 | low) & ~0xF
        return (~mask & ((1 << 64) - 1)) + 1, low & 0xF

    # the virtio structures
    def structure(self, cfg_type):
        _, bar, offset, _ = self.caps[cfg_type]
        return self.read_bar(bar) + offset

    def common_read(self, field, size):
        return int.from_bytes(self.mmio.read(self.structure(P.CAP_COMMON_CFG) + field, size), "little")

    def common_write(self, field, size, value):
        self.mmio.write(self.structure(P.CAP_COMMON_CFG) + field, value.to_bytes(size, "little"))

    def read_isr(self):
        return self.mmio.read(self.structure(P.CAP_ISR_CFG), 1)[0]

    def notify_address(self, queue):
        pointer = self.caps[P.CAP_NOTIFY_CFG][0]
        multiplier = self.cfg_read(pointer + P.CAP_NOTIFY_OFF_MULTIPLIER, 4)
        self.common_write(P.QUEUE_SELECT, 2, queue)
        return self.structure(P.CAP_NOTIFY_CFG) + self.common_read(P.QUEUE_NOTIFY_OFF, 2) * multiplier

    def kick(self, queue):
        self.mmio.write(self.notify_address(queue), struct.pack("<H", queue))

    # MSI-X
    def enable_msix(self, vectors):
        control = self.msix_cap + mx.CONTROL
        self.cfg_write(control, 2, self.cfg_read(control, 2) | mx.CONTROL_ENABLE | mx.CONTROL_FUNCTION_MASK)
        table_bir = self.cfg_read(self.msix_cap + mx.TABLE_OFFSET_BIR, 4)
        table = self.read_bar(table_bir & mx.BIR_MASK) + (table_bir & ~mx.BIR_MASK)
        for vector in range(vectors):
            entry = table + vector * mx.ENTRY_SIZE
            self.mmio.write(entry, struct.pack("<IIII", MSI_ADDRESS, 0, 0x40 + vector, 0))
        self.cfg_write(control, 2, self.cfg_read(control, 2) & ~mx.CONTROL_FUNCTION_MASK)

    # virtio
    def negotiate(self, features=None):
        self.common_write(P.DEVICE_STATUS, 1, 0)
        assert self.common_read(P.DEVICE_STATUS, 1) == 0
        self.common_write(P.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE)
        self.common_write(P.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = 0
        for select in (0, 1):
            self.common_write(P.DEVICE_FEATURE_SELECT, 4, select)
            offered |= self.common_read(P.DEVICE_FEATURE, 4) << (32 * select)
        wanted = offered & (VIRTIO_F_VERSION_1 if features is None else features)
        for select in (0, 1):
            self.common_write(P.DRIVER_FEATURE_SELECT, 4, select)
            self.common_write(P.DRIVER_FEATURE, 4, (wanted >> (32 * select)) & 0xFFFFFFFF)
        self.common_write(P.DEVICE_STATUS, 1, PROBE_STATUS)
        return bool(self.common_read(P.DEVICE_STATUS, 1) & STATUS_FEATURES_OK)

    def setup_queue(self, index, size=8, vector=None, *, ram_start=0x10000):
        self.common_write(P.QUEUE_SELECT, 2, index)
        assert self.common_read(P.QUEUE_SIZE, 2) >= size and self.common_read(P.QUEUE_ENABLE, 2) == 0
        q = DriverQueue(self.m.memory, BumpAllocator(ram_start, RAM), size, event_idx=False)
        self.common_write(P.QUEUE_SIZE, 2, size)
        for field, address in ((P.QUEUE_DESC, q.desc_table), (P.QUEUE_DRIVER, q.avail_ring),
                               (P.QUEUE_DEVICE, q.used_ring)):
            self.common_write(field, 4, address & 0xFFFFFFFF)        # vp_iowrite64_twopart
            self.common_write(field + 4, 4, address >> 32)
        if vector is not None:
            self.common_write(P.QUEUE_MSIX_VECTOR, 2, vector)
            assert self.common_read(P.QUEUE_MSIX_VECTOR, 2) == vector
        return q

    def enable_queue(self, index):
        self.common_write(P.QUEUE_SELECT, 2, index)
        self.common_write(P.QUEUE_ENABLE, 2, 1)

    def driver_ok(self):
        self.common_write(P.DEVICE_STATUS, 1, PROBE_STATUS | STATUS_DRIVER_OK)

    def probe(self, *, msix=True):
        """The whole probe of a one-queue device: MSI-X vector 0 for config, 1 for the queue."""
        if msix:
            self.enable_msix(2)
        assert self.negotiate()
        if msix:
            self.common_write(P.CONFIG_MSIX_VECTOR, 2, 0)
            assert self.common_read(P.CONFIG_MSIX_VECTOR, 2) == 0
        q = self.setup_queue(0, vector=1 if msix else None)
        self.enable_queue(0)
        self.driver_ok()
        return q


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, RAM)]) as memory:
        yield memory


@pytest.fixture
def machine(memory):
    return Machine(memory)


# --- discovery ---------------------------------------------------------------------------------


def test_identity_and_class(machine):
    d = LinuxDriver(machine)
    assert d.cfg_read(cfg.VENDOR_ID, 2) == 0x1AF4
    assert d.cfg_read(cfg.DEVICE_ID, 2) == 0x1040 + 4
    assert d.cfg_read(cfg.REVISION_ID, 1) == 1
    assert d.cfg_read(cfg.CLASS_CODE, 3) == 0x00FF00
    assert d.cfg_read(cfg.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert d.cfg_read(cfg.SUBSYSTEM_ID, 2) >= 0x40
    assert d.cfg_read(cfg.INTERRUPT_PIN, 1) == cfg.INTA
    assert machine.transport.name == "rng0"


@pytest.mark.parametrize("device_id, class_code", [(1, 0x020000), (2, 0x010000), (3, 0x078000),
                                                   (19, 0x078000), (4, 0x00FF00), (5, 0x00FF00)])
def test_class_code_by_device_type(device_id, class_code):
    device = VirtioDevice((8,))
    device.device_id = device_id
    t = P.VirtioPciTransport(device, None)
    assert t.config.class_code == class_code and t.config.device_id == 0x1040 + device_id


def test_device_ids_outside_the_modern_range_are_refused():
    device = VirtioDevice((8,))
    device.device_id = 0x40
    with pytest.raises(ValueError, match="no modern PCI device ID"):
        P.VirtioPciTransport(device, None)


def test_capabilities_and_bar_as_linux_finds_them(machine):
    d = LinuxDriver(machine)
    assert set(d.caps) == {P.CAP_COMMON_CFG, P.CAP_NOTIFY_CFG, P.CAP_ISR_CFG, P.CAP_DEVICE_CFG, P.CAP_PCI_CFG}
    size, flags = d.size_bar(P.VIRTIO_BAR)
    assert flags == cfg.BAR_MEM_TYPE_64 | cfg.BAR_MEM_PREFETCH
    assert d.read_bar(P.VIRTIO_BAR) == d.bar_base != 0                     # sizing put the address back
    for cfg_type, minimum in ((P.CAP_COMMON_CFG, 0x38), (P.CAP_NOTIFY_CFG, 2), (P.CAP_ISR_CFG, 1),
                              (P.CAP_DEVICE_CFG, 1)):
        pointer, bar, offset, length = d.caps[cfg_type]
        assert bar == P.VIRTIO_BAR and length >= minimum and offset + length <= size and offset % 4 == 0
        assert d.cfg_read(pointer + 2, 1) >= 16                                # cap_len
    notify = d.caps[P.CAP_NOTIFY_CFG][0]
    assert d.cfg_read(notify + 2, 1) == 20 and d.cfg_read(notify + P.CAP_NOTIFY_OFF_MULTIPLIER, 4) == 4
    assert d.cfg_read(d.caps[P.CAP_PCI_CFG][0] + 2, 1) == 20
    # MSI-X: num_queues + 1 vectors, table and PBA in a BAR of their own
    assert d.msix_cap is not None
    assert (d.cfg_read(d.msix_cap + mx.CONTROL, 2) & mx.CONTROL_TABLE_SIZE) + 1 == 2
    table_bar = d.cfg_read(d.msix_cap + mx.TABLE_OFFSET_BIR, 4) & mx.BIR_MASK
    assert table_bar != P.VIRTIO_BAR and d.read_bar(table_bar) != 0
    assert d.common_read(P.NUM_QUEUES, 2) == 1


# --- the driver's protocol ---------------------------------------------------------------------


def test_request_with_msix(machine):
    m, d = machine, LinuxDriver(machine)
    q = d.probe()
    assert m.device.active and m.transport.queue_vector(0) == 1 and m.transport.config_vector == 0
    assert m.vectors[1].state == (MSI_ADDRESS, 0x41, False)
    head = q.add([], [32])
    d.kick(0)
    assert q.take_used() == [(head, 32)] and q.written(head) == b"\xab" * 32
    assert m.sent() == [0, 1]                                 # the queue's vector, not the config one
    assert m.transport.isr == 0 and not m.line.level          # no INTx while MSI-X is on


def test_masked_vector_stays_pending_until_unmasked(machine):
    m, d = machine, LinuxDriver(machine)
    q = d.probe()
    control = d.msix_cap + mx.CONTROL
    d.cfg_write(control, 2, d.cfg_read(control, 2) | mx.CONTROL_FUNCTION_MASK)
    q.add([], [4])
    d.kick(0)
    assert m.sent() == [0, 0] and m.transport.msix.is_pending(1)
    d.cfg_write(control, 2, d.cfg_read(control, 2) & ~mx.CONTROL_FUNCTION_MASK)
    assert m.sent() == [0, 1]


def test_vector_out_of_range_reads_back_no_vector(machine):
    d = LinuxDriver(machine)
    d.enable_msix(2)
    d.negotiate()
    d.common_write(P.CONFIG_MSIX_VECTOR, 2, 2)                # the table has vectors 0 and 1
    assert d.common_read(P.CONFIG_MSIX_VECTOR, 2) == P.NO_VECTOR
    d.common_write(P.QUEUE_SELECT, 2, 0)
    d.common_write(P.QUEUE_MSIX_VECTOR, 2, 7)
    assert d.common_read(P.QUEUE_MSIX_VECTOR, 2) == P.NO_VECTOR
    d.common_write(P.QUEUE_MSIX_VECTOR, 2, 1)
    assert d.common_read(P.QUEUE_MSIX_VECTOR, 2) == 1
    d.common_write(P.QUEUE_SELECT, 2, 5)                      # no such queue
    assert d.common_read(P.QUEUE_SIZE, 2) == 0 and d.common_read(P.QUEUE_MSIX_VECTOR, 2) == P.NO_VECTOR
    d.common_write(P.QUEUE_MSIX_VECTOR, 2, 0)                 # ignored, no IndexError


def test_no_vector_means_no_interrupt(machine):
    m, d = machine, LinuxDriver(machine)
    d.enable_msix(2)
    d.negotiate()
    q = d.setup_queue(0, vector=P.NO_VECTOR)
    d.enable_queue(0)
    d.driver_ok()
    q.add([], [4])
    d.kick(0)
    assert q.take_used() and m.sent() == [0, 0] and not m.line.level and m.transport.isr == 0


def test_intx_fallback_and_isr_read_to_clear(machine):
    m, d = machine, LinuxDriver(machine)
    q = d.probe(msix=False)
    head = q.add([], [8])
    d.kick(0)
    assert q.take_used() == [(head, 8)]
    assert m.line.level and m.transport.intx_asserted
    assert d.cfg_read(cfg.STATUS, 2) & cfg.STATUS_INTERRUPT
    assert d.read_isr() == P.ISR_QUEUE
    assert not m.line.level and d.read_isr() == 0
    m.device.config_changed()
    assert m.line.level and d.read_isr() == P.ISR_CONFIG and not m.line.level
    assert m.sent() == [0, 0]


def test_enabling_msix_takes_the_device_off_intx(machine):
    m, d = machine, LinuxDriver(machine)
    d.probe(msix=False)
    m.device.config_changed()
    assert m.line.level
    d.enable_msix(2)
    assert not m.line.level


def test_features_without_version_1_are_refused(machine):
    d = LinuxDriver(machine)
    assert not d.negotiate(features=0)
    assert not machine.device.active


def test_queue_setup_is_frozen_after_driver_ok(machine):
    m, d = machine, LinuxDriver(machine)
    q = d.probe()
    d.common_write(P.QUEUE_SELECT, 2, 0)
    d.common_write(P.QUEUE_DESC, 8, 0x123000)
    d.common_write(P.QUEUE_SIZE, 2, 2)
    assert m.device.queues[0].desc_table == q.desc_table and m.device.queues[0].size == 8


def test_64_bit_and_split_ring_address_accesses(machine):
    d = LinuxDriver(machine)
    d.negotiate()
    d.common_write(P.QUEUE_SELECT, 2, 0)
    d.common_write(P.QUEUE_DESC, 8, 0x1_2345_6780)
    assert d.common_read(P.QUEUE_DESC, 8) == 0x1_2345_6780
    assert d.common_read(P.QUEUE_DESC, 4) == 0x2345_6780 and d.common_read(P.QUEUE_DESC + 4, 4) == 1
    d.common_write(P.QUEUE_DEVICE + 4, 4, 2)
    d.common_write(P.QUEUE_DEVICE, 4, 0x1000)
    assert machine.device.queues[0].used_ring == 0x2_0000_1000


def test_odd_sized_common_accesses_are_ignored(machine):
    d = LinuxDriver(machine)
    d.negotiate()
    d.common_write(P.QUEUE_SELECT, 1, 3)                      # a byte into a 16-bit field
    assert d.common_read(P.QUEUE_SELECT, 2) == 0
    assert d.common_read(P.DEVICE_FEATURE, 2) == 0            # half of a 32-bit field
    d.common_write(P.DEVICE_STATUS, 2, 0)                     # a word over status + generation
    assert d.common_read(P.DEVICE_STATUS, 1) == PROBE_STATUS
    d.common_write(P.QUEUE_DESC + 2, 4, 0xFFFF)               # misaligned half
    assert d.common_read(P.QUEUE_DESC, 8) == 0
    assert d.common_read(P.QUEUE_DESC + 4, 8) == 0            # misaligned 64-bit read
    d.common_write(P.NUM_QUEUES, 2, 9)                        # read-only
    assert d.common_read(P.NUM_QUEUES, 2) == 1


def test_notify_writes_reach_on_notify_by_address(machine):
    m, d = machine, LinuxDriver(machine)
    kicks = []
    m.transport.on_notify = kicks.append
    q = d.probe()
    q.add([], [4])
    d.kick(0)
    assert kicks == [0] and q.take_used() == []
    notify = d.structure(P.CAP_NOTIFY_CFG)
    d.mmio.write(notify + 4, b"\x01\x00")                     # queue 1 does not exist
    d.mmio.write(notify + 2, b"\x00\x00")                     # between two queues
    assert kicks == [0]


def test_device_config_through_the_bar(memory):
    class WithConfig(VirtioDevice):
        device_id = 4

        def __init__(self):
            super().__init__((8,))
            self.written = []

        def config_bytes(self):
            return bytes(range(1, 9))

        def write_config(self, offset, data):
            self.written.append((offset, bytes(data)))

    m = Machine(memory, WithConfig())
    d = LinuxDriver(m)
    base = d.structure(P.CAP_DEVICE_CFG)
    assert d.mmio.read(base, 4) == b"\x01\x02\x03\x04" and d.mmio.read(base + 6, 2) == b"\x07\x08"
    d.mmio.write(base + 4, b"\x99")
    assert m.device.written == [(4, b"\x99")]


# --- needs reset and reset ---------------------------------------------------------------------------


def test_broken_ring_sets_needs_reset_and_signals_the_config_vector(machine):
    m, d = machine, LinuxDriver(machine)
    q = d.probe()
    generation = d.common_read(P.CONFIG_GENERATION, 1)
    q.set_avail_idx(100)
    d.kick(0)
    assert d.common_read(P.DEVICE_STATUS, 1) & STATUS_DEVICE_NEEDS_RESET
    assert m.sent() == [1, 0]
    assert d.common_read(P.CONFIG_GENERATION, 1) != generation
    d.common_write(P.DEVICE_STATUS, 1, 0)                     # reset: vectors forgotten, device works again
    assert d.common_read(P.DEVICE_STATUS, 1) == 0 and not m.device.broken
    assert d.common_read(P.CONFIG_MSIX_VECTOR, 2) == P.NO_VECTOR
    d.common_write(P.QUEUE_SELECT, 2, 0)
    assert d.common_read(P.QUEUE_MSIX_VECTOR, 2) == P.NO_VECTOR
    assert d.common_read(P.QUEUE_ENABLE, 2) == 0
    q = d.probe()
    head = q.add([], [1])
    d.kick(0)
    assert q.take_used() == [(head, 1)] and m.sent() == [1, 1]


def test_needs_reset_with_intx(machine):
    m, d = machine, LinuxDriver(machine)
    q = d.probe(msix=False)
    q.set_avail_idx(100)
    d.kick(0)
    assert d.common_read(P.DEVICE_STATUS, 1) & STATUS_DEVICE_NEEDS_RESET
    assert m.line.level and d.read_isr() == P.ISR_CONFIG


def test_needs_reset_before_driver_ok_is_not_signalled(machine):
    m = machine
    m.transport.set_needs_reset()
    d = LinuxDriver(m)
    assert d.common_read(P.DEVICE_STATUS, 1) & STATUS_DEVICE_NEEDS_RESET
    assert not m.line.level and m.transport.isr == 0
    d.common_write(P.DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE)    # the driver cannot clear it but by reset
    assert d.common_read(P.DEVICE_STATUS, 1) == STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET


def test_reset_drops_a_pending_intx(machine):
    m, d = machine, LinuxDriver(machine)
    q = d.probe(msix=False)
    q.add([], [1])
    d.kick(0)
    assert m.line.level
    d.common_write(P.DEVICE_STATUS, 1, 0)
    assert not m.line.level and m.transport.isr == 0


# --- queue enable rules shared with virtio-mmio -----------------------------------------------------


class TwoQueues(VirtioDevice):
    device_id = 4

    def __init__(self):
        super().__init__((8, 8))

    def process_queue(self, queue_index):
        queue = self.queues[queue_index]
        while (chain := queue.pop()) is not None:
            queue.push(chain, 0)
        self.signal_used(queue_index)


def test_a_queue_cannot_be_enabled_after_driver_ok(memory):
    m = Machine(memory, TwoQueues())
    d = LinuxDriver(m)
    d.enable_msix(3)
    d.negotiate()
    d.setup_queue(0, vector=1)
    d.enable_queue(0)
    d.common_write(P.QUEUE_ENABLE, 2, 0)                      # only a queue reset may disable it
    assert d.common_read(P.QUEUE_ENABLE, 2) == 1
    d.common_write(P.QUEUE_SELECT, 2, 1)
    d.common_write(P.QUEUE_ENABLE, 2, 2)
    assert d.common_read(P.QUEUE_ENABLE, 2) == 0
    d.driver_ok()
    d.enable_queue(1)                                         # never set up nor activated
    assert d.common_read(P.QUEUE_ENABLE, 2) == 0
    d.kick(1)                                                 # ignored, not an AttributeError


def test_mmio_queue_ready_after_driver_ok_only_takes_a_queue_down(memory):
    device = TwoQueues()
    t = M.VirtioMmioTransport(device, Line(), memory)

    def wr(offset, value):
        t.write(offset, struct.pack("<I", value))

    wr(M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    wr(M.DRIVER_FEATURES_SEL, 1)
    wr(M.DRIVER_FEATURES, 1)
    wr(M.STATUS, PROBE_STATUS)
    q = DriverQueue(memory, BumpAllocator(0x10000, RAM), 8)
    wr(M.QUEUE_SEL, 0)
    wr(M.QUEUE_NUM, 8)
    for low, address in ((M.QUEUE_DESC_LOW, q.desc_table), (M.QUEUE_DRIVER_LOW, q.avail_ring),
                         (M.QUEUE_DEVICE_LOW, q.used_ring)):
        wr(low, address)
    wr(M.QUEUE_READY, 1)
    wr(M.STATUS, PROBE_STATUS | STATUS_DRIVER_OK)
    t.irq.trigger = lambda: None
    wr(M.QUEUE_SEL, 1)
    wr(M.QUEUE_READY, 1)
    wr(M.QUEUE_NOTIFY, 1)                                     # must not reach an unactivated ring
    assert not device.queues[1].ready
    wr(M.QUEUE_SEL, 0)
    wr(M.QUEUE_READY, 0)
    assert not device.queues[0].ready


# --- the PCI_CFG window ---------------------------------------------------------------------------


def window(d, bar, offset, length):
    pointer = d.caps[P.CAP_PCI_CFG][0]
    d.cfg_write(pointer + P.CAP_BAR, 1, bar)
    d.cfg_write(pointer + P.CAP_OFFSET, 4, offset)
    d.cfg_write(pointer + P.CAP_LENGTH, 4, length)
    return pointer + P.CAP_PCI_CFG_DATA


def test_pci_cfg_window_reaches_the_bar_with_decode_off(machine):
    m, d = machine, LinuxDriver(machine)
    common = d.caps[P.CAP_COMMON_CFG][2]
    d.cfg_write(cfg.COMMAND, 2, d.cfg_read(cfg.COMMAND, 2) & ~cfg.COMMAND_MEMORY)
    assert m.transport.bar_address(P.VIRTIO_BAR) is None
    data = window(d, P.VIRTIO_BAR, common + P.NUM_QUEUES, 2)
    assert d.cfg_read(data, 2) == 1
    window(d, P.VIRTIO_BAR, common + P.DEVICE_STATUS, 1)
    d.cfg_write(data, 4, STATUS_ACKNOWLEDGE)
    assert m.transport.status == STATUS_ACKNOWLEDGE
    window(d, P.VIRTIO_BAR, common + P.DEVICE_FEATURE_SELECT, 4)
    d.cfg_write(data, 4, 1)
    window(d, P.VIRTIO_BAR, common + P.DEVICE_FEATURE, 4)
    assert d.cfg_read(data, 4) == 1                           # VIRTIO_F_VERSION_1 is bit 32


def test_pci_cfg_window_ignores_unusable_targets(machine):
    m, d = machine, LinuxDriver(machine)
    common = d.caps[P.CAP_COMMON_CFG][2]
    data = window(d, P.VIRTIO_BAR, common + P.DEVICE_STATUS, 3)     # bad length
    d.cfg_write(data, 4, STATUS_ACKNOWLEDGE)
    window(d, P.VIRTIO_BAR, common + P.QUEUE_SELECT + 1, 2)         # misaligned
    d.cfg_write(data, 4, 0x0101)
    window(d, 2, 0, 4)                                              # no such BAR
    d.cfg_read(data, 4)
    window(d, P.VIRTIO_BAR, P.VIRTIO_BAR_SIZE, 4)                   # past the end
    d.cfg_read(data, 4)
    assert m.transport.status == 0 and m.transport.queue_sel == 0


# --- on_notify_moved ----------------------------------------------------------------------------


def test_on_notify_moved_follows_the_bar(machine):
    m, d = machine, LinuxDriver(machine)
    moves = []
    m.transport.on_notify_moved = lambda old, new, offsets: moves.append((old, new, offsets))
    base = d.bar_base
    offsets = m.transport.notify_offsets()
    assert moves == [(None, base, offsets)]                        # already mapped when assigned
    assert [(o, n) for o, n, _ in offsets] == [(P.NOTIFY_OFFSET, 2)]
    assert base + offsets[0][0] == d.notify_address(0)

    # the guest moves the BAR, decode off around it as Linux does
    new = base + 0x10_0000
    command = d.cfg_read(cfg.COMMAND, 2)
    d.cfg_write(cfg.COMMAND, 2, command & ~cfg.COMMAND_MEMORY)
    d.cfg_write(cfg.BAR0 + 4 * P.VIRTIO_BAR, 4, new & 0xFFFFFFFF)
    d.cfg_write(cfg.BAR0 + 4 * P.VIRTIO_BAR + 4, 4, new >> 32)
    d.cfg_write(cfg.COMMAND, 2, command)
    assert moves[1:] == [(base, None, offsets), (None, new, offsets)]

    # and the registers are at the new address
    q = d.probe()
    head = q.add([], [4])
    m.mmio.write(new + offsets[0][0], b"\x00\x00")
    assert q.take_used() == [(head, 4)]
    assert m.mmio.read(base + P.COMMON_OFFSET + P.NUM_QUEUES, 2) == b"\xff\xff"   # nothing at the old one


def test_on_notify_moved_when_bar_unmapped_is_only_called_later(memory):
    m = Machine(memory)
    d = LinuxDriver(m)
    d.cfg_write(cfg.COMMAND, 2, d.cfg_read(cfg.COMMAND, 2) & ~cfg.COMMAND_MEMORY)
    moves = []
    m.transport.on_notify_moved = lambda *args: moves.append(args)
    assert moves == []
    d.cfg_write(cfg.COMMAND, 2, d.cfg_read(cfg.COMMAND, 2) | cfg.COMMAND_MEMORY)
    assert moves == [(None, d.bar_base, m.transport.notify_offsets())]


def test_each_queue_has_its_own_notify_address(memory):
    m = Machine(memory, TwoQueues())
    d = LinuxDriver(m)
    offsets = m.transport.notify_offsets()
    assert [index for _, _, index in offsets] == [0, 1]
    assert len({offset for offset, _, _ in offsets}) == 2
    assert [d.bar_base + offset for offset, _, _ in offsets] == [d.notify_address(0), d.notify_address(1)]


# --- queue_eventfd ----------------------------------------------------------------------------------


def test_queue_eventfd_is_the_assigned_vectors_fd(machine):
    m, d = machine, LinuxDriver(machine)
    assert m.transport.queue_eventfd(0) is None               # MSI-X off
    d.probe()
    assert m.transport.queue_eventfd(0) == m.vectors[1].eventfd
    assert m.transport.queue_eventfd(1) is None               # no such queue
    m.transport.reset()
    assert m.transport.queue_eventfd(0) is None               # NO_VECTOR


def test_queue_eventfd_without_connected_vectors(memory):
    m = Machine(memory, connect_msi=False)                    # the root has no factory either
    d = LinuxDriver(m)
    d.probe()
    assert m.transport.queue_eventfd(0) is None


# --- snapshots --------------------------------------------------------------------------------------


def test_save_restore_round_trip(memory):
    m = Machine(memory)
    d = LinuxDriver(m)
    q = d.probe()
    q.add([], [2])
    d.kick(0)
    q.take_used()
    state = through_json(m.transport.save())

    other = Machine(memory, VirtioRng(source=lambda n: b"\xcd" * n))
    moves = []
    other.transport.on_notify_moved = lambda old, new, offsets: moves.append((old, new))
    other.transport.restore(state)
    assert other.transport.save() == state
    assert other.device.active and other.transport.status & STATUS_DRIVER_OK
    assert other.transport.queue_vector(0) == 1 and other.transport.config_vector == 0
    assert other.vectors[1].state == (MSI_ADDRESS, 0x41, False)
    assert other.transport.bar_address(P.VIRTIO_BAR) == d.bar_base
    od = LinuxDriver(other)
    head = q.add([], [2])
    od.kick(0)
    assert q.take_used() == [(head, 2)] and q.written(head) == b"\xcd\xcd"
    assert other.sent() == [0, 1]


def test_save_restore_keeps_intx_state(memory):
    m = Machine(memory)
    d = LinuxDriver(m)
    q = d.probe(msix=False)
    q.add([], [1])
    d.kick(0)
    state = through_json(m.transport.save())
    other = Machine(memory)
    other.transport.restore(state)
    assert other.line.level and LinuxDriver(other).read_isr() == P.ISR_QUEUE and not other.line.level


def test_restore_rejects_foreign_state(machine, memory):
    with pytest.raises(StateError, match="virtio_pci state expected"):
        machine.transport.restore({"config": {}})
    before = machine.transport.save()
    state = Machine(memory, TwoQueues()).transport.save()
    with pytest.raises(StateError, match="queue_vectors: 2 vectors, rng0 has 1 queues"):
        machine.transport.restore(state)
    with pytest.raises(StateError, match=r"queue_vectors\[0\]: 7 is not one of 2 MSI-X vectors"):
        machine.transport.restore(changed(before, queue_vectors=(7,)))
    assert machine.transport.save() == before


# --- hostile drivers ----------------------------------------------------------------------------------

_writes = st.lists(st.tuples(st.integers(0, 0x40), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
                   max_size=40)


@settings(max_examples=150, deadline=None)
@given(writes=_writes, kick=st.booleans(), msix=st.booleans())
def test_random_common_config_writes_never_raise(writes, kick, msix):
    with GuestMemory.from_specs([RegionSpec(0, RAM)]) as memory:
        m = Machine(memory, TwoQueues())
        d = LinuxDriver(m)
        if msix:
            d.enable_msix(3)
        base = d.structure(P.CAP_COMMON_CFG)
        for offset, size, value in writes:
            m.mmio.write(base + offset, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
            assert len(m.mmio.read(base + offset, size)) == size
        if kick:
            for queue in range(3):
                m.mmio.write(d.bar_base + P.NOTIFY_OFFSET + 4 * queue, b"\0\0")
        assert d.common_read(P.NUM_QUEUES, 2) == 2
        assert d.common_read(P.CONFIG_MSIX_VECTOR, 2) in (0, 1, 2, P.NO_VECTOR)
        state = m.transport.save()
        fresh = Machine(memory, TwoQueues())
        fresh.transport.restore(through_json(state))    # any reachable state round-trips
        assert fresh.transport.save() == state


# --- the builder's wiring ------------------------------------------------------------------------------


class FakeAccel:
    def __init__(self):
        self.ioeventfds = {}      # fd -> (address, length, datamatch)
        self.next_fd = 1000
        self.vectors = []

    def irq_line(self, gsi):
        return Line()

    def msi_vector(self):
        vector = FakeMsiVector(len(self.vectors))
        self.vectors.append(vector)
        return vector

    def add_ioeventfd(self, address, length, *, datamatch=None, eventfd=None):
        self.next_fd += 1
        self.ioeventfds[self.next_fd] = (address, length, datamatch)
        return self.next_fd

    def remove_ioeventfd(self, fd, address, length, *, datamatch=None):
        assert self.ioeventfds.pop(fd) == (address, length, datamatch)


class FakeIoThread:
    def __init__(self):
        self.readers = {}

    def add_eventfd(self, fd, callback):
        self.readers[fd] = callback

    def remove_reader(self, fd):
        del self.readers[fd]

    def call_soon(self, callback):
        callback()


def test_wiring_keeps_ioeventfds_on_the_notify_addresses(memory):
    from pyvmm.devmgr import DeviceManager, Request
    from pyvmm.virtio_wiring import VirtioWiring

    accel, iothread = FakeAccel(), FakeIoThread()
    pio, mmio = PioBus(), MmioBus()
    root = PciRoot(pio, mmio, ecam_base=ECAM, mmio32_window=MMIO32, mmio64_window=MMIO64,
                   irq_line=accel.irq_line, msi_vector=accel.msi_vector)
    manager = DeviceManager()
    manager.add("pci", "pci-root", Request(), transport="platform", device=root)
    wiring = VirtioWiring(accel, memory, mmio, iothread, manager, root, "pci")
    device = TwoQueues()
    transport = wiring.add("rng0", "virtio-rng", device, "pci")
    node = manager.tree.get("rng0")
    assert (node.parent, node.transport, node.resources.pci_slot) == ("pci", "virtio-pci", 1)
    assert manager.transport("rng0") is transport and manager.device("rng0") is device
    base = transport.bar_address(P.VIRTIO_BAR)
    assert sorted(accel.ioeventfds.values()) == [(base + P.NOTIFY_OFFSET, 2, 0), (base + P.NOTIFY_OFFSET + 4, 2, 1)]
    assert len(accel.vectors) == 3 and transport.msix.msi_vectors == accel.vectors

    slot = next(slot for slot, plugged in root.devices.items() if plugged is transport)
    d = LinuxDriver(SimpleNamespace(mmio=mmio, slot=slot, memory=memory))
    new = base + 0x100_0000
    d.cfg_write(cfg.COMMAND, 2, d.cfg_read(cfg.COMMAND, 2) & ~cfg.COMMAND_MEMORY)
    assert accel.ioeventfds == {} and iothread.readers == {}
    d.cfg_write(cfg.BAR0 + 4 * P.VIRTIO_BAR, 4, new & 0xFFFFFFFF)
    d.cfg_write(cfg.BAR0 + 4 * P.VIRTIO_BAR + 4, 4, new >> 32)
    d.cfg_write(cfg.COMMAND, 2, d.cfg_read(cfg.COMMAND, 2) | cfg.COMMAND_MEMORY)
    assert sorted(accel.ioeventfds.values()) == [(new + P.NOTIFY_OFFSET, 2, 0), (new + P.NOTIFY_OFFSET + 4, 2, 1)]
    assert sorted(iothread.readers) == sorted(accel.ioeventfds)
