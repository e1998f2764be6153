"""virtio-blk asks for no kick while it is taking requests anyway, and for one again after."""

import struct

import pytest

from helpers.virtio_driver import FakeDriver, needs_kick
from pyvmm.devices.virtio.blk import VirtioBlock
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec


def read_request(sector: int) -> tuple[list[bytes], list[int]]:
    return [struct.pack("<IIQ", 0, 0, sector)], [4096, 1]


@pytest.fixture
def setup(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with GuestMemory.from_specs([RegionSpec(0, 8 << 20)]) as memory:
        device = VirtioBlock(image)
        yield memory, device
        device.close()


def add_during_first_request(device, queue, seen):
    """The driver adds a request while the device serves the first (as a vCPU does meanwhile)."""
    execute = device._execute

    def hooked(chain, header):
        if not seen:
            old = queue.avail_idx
            queue.add(*read_request(8))
            seen.append((old, queue.avail_idx, queue.avail_event(), queue.memory.read_u16(queue.used_ring)))
        return execute(chain, header)
    device._execute = hooked


def test_with_event_idx_a_request_added_meanwhile_needs_no_kick_and_is_served(setup):
    memory, device = setup
    driver = FakeDriver(memory, device, queue_size=16)
    assert device.has_feature(VIRTIO_F_EVENT_IDX)
    queue, seen = driver.queue(0), []
    add_during_first_request(device, queue, seen)
    queue.add(*read_request(0))
    device.notify(0)
    [(old, new, avail_event, _)] = seen
    assert not needs_kick(avail_event, new, old)
    assert [written for _, written in queue.take_used()] == [4097, 4097]   # both, from the one kick
    # afterwards the driver kicks for its next request again
    assert queue.avail_event() == queue.avail_idx
    assert needs_kick(queue.avail_event(), queue.avail_idx + 1, queue.avail_idx)


def test_without_event_idx_no_notify_is_set_while_serving_and_cleared_after(setup):
    memory, device = setup
    driver = FakeDriver(memory, device, queue_size=16, features=device.offered_features & ~VIRTIO_F_EVENT_IDX)
    queue, seen = driver.queue(0), []
    add_during_first_request(device, queue, seen)
    queue.add(*read_request(0))
    device.notify(0)
    [(_, _, _, used_flags)] = seen
    assert used_flags == 1                                    # VIRTQ_USED_F_NO_NOTIFY
    assert len(queue.take_used()) == 2
    assert memory.read_u16(queue.used_ring) == 0


def test_a_ring_broken_while_serving_leaves_kicks_allowed(setup):
    memory, device = setup
    driver = FakeDriver(memory, device, queue_size=16)
    queue = driver.queue(0)
    queue.add(*read_request(0))
    queue.set_avail_idx(queue.avail_idx + 40)                 # more than the queue holds
    device.notify(0)
    assert device.broken
    assert not device.queues[0].kicks_suppressed
