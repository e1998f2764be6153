"""virtio-mmio transport: the driver's register protocol, end to end with virtio-rng."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.state import changed, through_json
from helpers.virtio_driver import BumpAllocator, DriverQueue
from pyvmm.devices.virtio import mmio as M
from pyvmm.devices.virtio.device import (
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
)
from pyvmm.devices.virtio.blk import VirtioBlock as VirtioBlk
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.persist import StateError
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec


class Line:
    def __init__(self):
        self.pulses = 0

    def set_level(self, high):
        raise AssertionError("virtio-mmio interrupts are edge-triggered")

    def trigger(self):
        self.pulses += 1


@pytest.fixture
def setup():
    with GuestMemory.from_specs([RegionSpec(0, 1 << 20)]) as memory:
        line = Line()
        device = VirtioRng(source=lambda n: b"\xab" * n)
        yield memory, line, device, M.VirtioMmioTransport(device, line, memory)


def rd(t, offset):
    return struct.unpack("<I", t.read(offset, 4))[0]


def wr(t, offset, value):
    t.write(offset, struct.pack("<I", value))


def probe(t, memory, *, features=None, size=8):
    """What Linux's virtio_mmio + virtio core do at probe time."""
    assert rd(t, M.MAGIC_VALUE) == M.MAGIC and rd(t, M.VERSION_REG) == 2
    wr(t, M.STATUS, 0)
    wr(t, M.STATUS, STATUS_ACKNOWLEDGE)
    wr(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    offered = 0
    for sel in (0, 1):
        wr(t, M.DEVICE_FEATURES_SEL, sel)
        offered |= rd(t, M.DEVICE_FEATURES) << (32 * sel)
    wanted = offered if features is None else features
    for sel in (0, 1):
        wr(t, M.DRIVER_FEATURES_SEL, sel)
        wr(t, M.DRIVER_FEATURES, (wanted >> (32 * sel)) & 0xFFFFFFFF)
    wr(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    if not rd(t, M.STATUS) & STATUS_FEATURES_OK:
        return None
    wr(t, M.QUEUE_SEL, 0)
    assert rd(t, M.QUEUE_NUM_MAX) >= size
    q = DriverQueue(memory, BumpAllocator(0x1000, 1 << 20), size, event_idx=False)
    wr(t, M.QUEUE_NUM, size)
    for low, address in ((M.QUEUE_DESC_LOW, q.desc_table), (M.QUEUE_DRIVER_LOW, q.avail_ring), (M.QUEUE_DEVICE_LOW, q.used_ring)):
        wr(t, low, address & 0xFFFFFFFF)
        wr(t, low + 4, address >> 32)
    wr(t, M.QUEUE_READY, 1)
    wr(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
    return q


def test_identity_registers(setup):
    memory, line, device, t = setup
    assert rd(t, M.DEVICE_ID) == 4
    assert rd(t, M.VENDOR) == M.VENDOR_ID
    wr(t, M.DEVICE_FEATURES_SEL, 1)
    assert rd(t, M.DEVICE_FEATURES) & 1  # VIRTIO_F_VERSION_1 is bit 32
    assert rd(t, M.SHM_LEN_LOW) == 0xFFFFFFFF


def test_request_through_the_registers(setup):
    memory, line, device, t = setup
    q = probe(t, memory)
    head = q.add([], [32])
    wr(t, M.QUEUE_NOTIFY, 0)
    assert q.take_used() == [(head, 32)] and q.written(head) == b"\xab" * 32
    assert line.pulses == 1 and rd(t, M.INTERRUPT_STATUS) == M.INT_USED_BUFFER
    wr(t, M.INTERRUPT_ACK, M.INT_USED_BUFFER)
    assert rd(t, M.INTERRUPT_STATUS) == 0
    assert rd(t, M.QUEUE_READY) == 1


def test_kick_can_be_rerouted_to_an_io_thread(setup):
    memory, line, device, t = setup
    kicks = []
    t.on_notify = kicks.append
    q = probe(t, memory)
    q.add([], [4])
    wr(t, M.QUEUE_NOTIFY, 0)
    assert kicks == [0] and q.take_used() == []
    assert t.notify_offsets() == [(M.QUEUE_NOTIFY, 4, 0)]


def test_features_without_version_1_are_refused(setup):
    memory, line, device, t = setup
    assert probe(t, memory, features=0) is None
    assert not device.active


def test_queue_setup_is_frozen_after_driver_ok(setup):
    memory, line, device, t = setup
    q = probe(t, memory)
    wr(t, M.QUEUE_DESC_LOW, 0x123000)
    assert device.queues[0].desc_table == q.desc_table


def test_broken_ring_sets_needs_reset_and_signals_config(setup):
    memory, line, device, t = setup
    q = probe(t, memory)
    q.set_avail_idx(100)
    wr(t, M.QUEUE_NOTIFY, 0)
    assert rd(t, M.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert rd(t, M.INTERRUPT_STATUS) & M.INT_CONFIG_CHANGE
    generation = rd(t, M.CONFIG_GENERATION)
    assert generation == 1
    wr(t, M.STATUS, 0)  # reset: the device works again after a new probe
    assert rd(t, M.STATUS) == 0 and not device.broken
    q = probe(t, memory)
    head = q.add([], [1])
    wr(t, M.QUEUE_NOTIFY, 0)
    assert q.take_used() == [(head, 1)]


def test_odd_sized_register_accesses_are_ignored(setup):
    memory, line, device, t = setup
    assert t.read(M.MAGIC_VALUE, 2) == b"\0\0"
    t.write(M.STATUS, b"\x01")
    assert rd(t, M.STATUS) == 0
    wr(t, M.QUEUE_SEL, 7)            # no such queue
    assert rd(t, M.QUEUE_NUM_MAX) == 0
    wr(t, M.QUEUE_NUM, 8)            # ignored, not an IndexError
    wr(t, M.QUEUE_NOTIFY, 7)


def test_save_restore_round_trip(setup):
    memory, line, device, t = setup
    q = probe(t, memory)
    state = through_json(t.save())
    other_device = VirtioRng(source=lambda n: b"\xcd" * n)
    other = M.VirtioMmioTransport(other_device, line, memory)
    other.restore(state)
    assert other.save() == state
    assert rd(other, M.STATUS) & STATUS_DRIVER_OK and other_device.active
    head = q.add([], [2])
    wr(other, M.QUEUE_NOTIFY, 0)
    assert q.take_used() == [(head, 2)] and q.written(head) == b"\xcd\xcd"
    assert other_device.acked_features & VIRTIO_F_VERSION_1


def test_restore_refuses_another_device_kind_and_changes_nothing(setup, tmp_path):
    memory, line, device, t = setup
    probe(t, memory)
    state = t.save()
    image = tmp_path / "disk"
    image.write_bytes(bytes(4096))
    blk = VirtioBlk(image)
    other = M.VirtioMmioTransport(blk, line, memory)
    before = other.save()
    with pytest.raises(StateError, match="virtio_blk state expected, got a 'virtio_rng' state"):
        other.restore(state)
    assert other.save() == before
    rng = VirtioRng()
    fresh = M.VirtioMmioTransport(rng, line, memory)
    bad_device = changed(state.device, virtio=changed(state.device.virtio, acked_features=1 << 63))
    with pytest.raises(StateError, match="acked_features: 0x8000000000000000 are not offered"):
        fresh.restore(changed(state, device=bad_device))
    assert fresh.save() == M.VirtioMmioTransport(VirtioRng(), line, memory).save()
    blk.close()


register = st.sampled_from([M.DEVICE_FEATURES_SEL, M.DRIVER_FEATURES_SEL, M.DRIVER_FEATURES, M.QUEUE_SEL,
                            M.QUEUE_NUM, M.QUEUE_READY, M.QUEUE_DESC_LOW, M.QUEUE_DRIVER_LOW, M.QUEUE_DEVICE_LOW,
                            M.INTERRUPT_ACK, M.STATUS, M.QUEUE_NOTIFY])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(register, st.integers(0, 0xFFFFFFFF)), max_size=30))
def test_any_register_state_round_trips(setup, writes):
    memory, line, device, t = setup
    for offset, value in writes:
        wr(t, offset, value & 0xFF if offset == M.STATUS else value)
    state = t.save()
    fresh = M.VirtioMmioTransport(VirtioRng(), line, memory)
    fresh.restore(through_json(state))
    assert fresh.save() == state


def test_a_device_that_needs_a_reset_stays_stopped_until_the_driver_resets_it(setup):
    memory, line, device, t = setup
    probe(t, memory)
    device.fail("the driver broke a ring")
    assert rd(t, M.STATUS) & STATUS_DEVICE_NEEDS_RESET and not device.active
    wr(t, M.STATUS, rd(t, M.STATUS) & ~STATUS_DEVICE_NEEDS_RESET & ~STATUS_DRIVER_OK)
    wr(t, M.STATUS, rd(t, M.STATUS) | STATUS_DRIVER_OK)      # DRIVER_OK again, without a reset
    assert not device.active and device.broken
    fresh = M.VirtioMmioTransport(VirtioRng(), line, memory)
    fresh.restore(through_json(t.save()))                     # and that state round-trips
    assert fresh.save() == t.save()
    probe(t, memory)                                           # a reset (status 0) and a new bring-up
    assert device.active and not device.broken
