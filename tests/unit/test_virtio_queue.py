"""Split virtqueue: requests, indirect tables, event index, and hostile rings (via virtio-rng)."""


import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers.state import changed, through_json
from helpers.virtio_driver import FakeDriver
from pyvmm.persist import StateError
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, SplitQueue,
    SplitQueueState, VirtqueueBroken,
)
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

RAM = 1 << 20


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, RAM)]) as mem:
        yield mem


def counting_source():
    counter = iter(range(1 << 30))
    return lambda n: bytes(next(counter) & 0xFF for _ in range(n))


def rng_with_driver(memory, **kw):
    device = VirtioRng(source=counting_source())
    return device, FakeDriver(memory, device, queue_size=8, **kw)


def test_request_is_filled_and_returned(memory):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    head = q.add([], [16, 8])
    device.notify(0)
    assert q.take_used() == [(head, 24)]
    assert q.written(head) == bytes(range(24))
    assert driver.interrupts.used == [0]


def test_indirect_table_is_followed(memory):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    head = q.add([], [4, 4, 4], indirect=True)
    device.notify(0)
    assert q.take_used() == [(head, 12)]
    assert q.written(head) == bytes(range(12))


def test_indirect_without_the_feature_fails_only_that_request(memory):
    device, driver = rng_with_driver(memory, features=VIRTIO_F_VERSION_1)
    q = driver.queue(0)
    bad = q.add([], [4], indirect=True)
    good = q.add([], [4])
    device.notify(0)
    assert q.take_used() == [(bad, 0), (good, 4)]
    assert not device.broken
    assert device.queues[0].malformed_chains == 1


def test_event_index_suppresses_and_requests_interrupts(memory):
    device, driver = rng_with_driver(memory)
    assert device.acked_features & VIRTIO_F_EVENT_IDX
    q = driver.queue(0)
    q.set_used_event(5)             # driver: interrupt me once used idx passes 5
    for _ in range(3):
        q.add([], [1])
    device.notify(0)
    assert driver.interrupts.used == []
    assert q.avail_event() == 3     # device: kick me for the next entry
    for _ in range(3):
        q.add([], [1])
    device.notify(0)
    assert driver.interrupts.used == [0]


def test_no_interrupt_flag_without_event_index(memory):
    device, driver = rng_with_driver(memory, features=VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
    q = driver.queue(0)
    q.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add([], [1])
    device.notify(0)
    assert driver.interrupts.used == [] and len(q.take_used()) == 1
    q.set_avail_flags(0)
    q.add([], [1])
    device.notify(0)
    assert driver.interrupts.used == [0]


def test_buffers_made_available_before_driver_ok_are_served(memory):
    device = VirtioRng(source=counting_source())
    driver = FakeDriver(memory, device, queue_size=8, activate=False)
    head = driver.queue(0).add([], [2])
    device.activate()
    assert driver.queue(0).take_used() == [(head, 2)]


@pytest.mark.parametrize("build", [
    "loop", "next-out-of-range", "buffer-outside-ram", "nested-indirect", "indirect-with-next",
    "readable-after-writable", "indirect-bad-length", "indirect-outside-ram", "huge-length",
])
def test_malformed_chain_fails_only_that_request(memory, build):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    buf = q.buffer(64)
    head = q.next_free
    if build == "loop":
        q.put_descriptor(head, buf, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, head + 1)
        q.put_descriptor(head + 1, buf, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, head)
    elif build == "next-out-of-range":
        q.put_descriptor(head, buf, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 8)
    elif build == "buffer-outside-ram":
        q.put_descriptor(head, RAM - 2, 4, VIRTQ_DESC_F_WRITE)
    elif build == "huge-length":
        q.put_descriptor(head, buf, 0xFFFFFFFF, VIRTQ_DESC_F_WRITE)
    elif build == "readable-after-writable":
        q.put_descriptor(head, buf, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, head + 1)
        q.put_descriptor(head + 1, buf, 4, 0)
    else:
        table = q.buffer(64)
        if build == "nested-indirect":
            q.put_descriptor(0, table, 16, VIRTQ_DESC_F_INDIRECT, table=table)
            q.put_descriptor(head, table, 16, VIRTQ_DESC_F_INDIRECT)
        elif build == "indirect-with-next":
            q.put_descriptor(0, buf, 4, VIRTQ_DESC_F_WRITE, table=table)
            q.put_descriptor(head, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, head + 1)
        elif build == "indirect-bad-length":
            q.put_descriptor(head, table, 17, VIRTQ_DESC_F_INDIRECT)
        elif build == "indirect-outside-ram":
            q.put_descriptor(head, RAM - 16, 32, VIRTQ_DESC_F_INDIRECT)
    q.next_free = head + 2
    q.publish(head)
    good = q.add([], [3])
    before = memory.read(0, RAM)
    device.notify(0)
    assert q.take_used() == [(head, 0), (good, 3)]
    assert not device.broken and not driver.interrupts.needs_reset
    after = memory.read(0, RAM)
    allowed = [(q.used_ring, 6 + 8 * q.size + 2), *q.writable[good]]
    changed = [i for i in range(RAM) if before[i] != after[i]]
    assert changed and all(any(a <= i < a + n for a, n in allowed) for i in changed)


def test_available_index_jump_needs_reset(memory):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    q.set_avail_idx(9)  # 9 new entries on a queue of 8
    device.notify(0)
    assert device.broken and driver.interrupts.needs_reset
    q.add([], [1])
    device.notify(0)    # a broken device serves nothing until reset
    assert q.take_used() == []


def test_head_out_of_range_needs_reset(memory):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    q.publish(200)
    device.notify(0)
    assert device.broken and driver.interrupts.needs_reset


def test_a_broken_ring_leaves_a_state_that_can_be_saved(memory):
    """A bad head or a head offered twice is refused before the entry is taken, so the queue's
    positions and the requests it holds still add up: a snapshot of the broken device works."""
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    queue = device.queues[0]
    head = q.add([], [4])
    chain = queue.pop()                 # the device holds it (as a receive buffer would be held)
    assert chain.head == head
    q.publish(head)                     # ... and the driver offers it again
    with pytest.raises(VirtqueueBroken, match="again while the device holds it"):
        queue.pop()
    with pytest.raises(VirtqueueBroken, match="again"):   # the refused entry was not taken
        queue.pop()
    state = through_json(device.save())
    assert state.virtio.queues[0].in_flight == (head,) and state.virtio.queues[0].last_avail == 1


def test_reset_after_breakage_serves_again(memory):
    device, driver = rng_with_driver(memory)
    driver.queue(0).publish(200)
    device.notify(0)
    assert device.broken
    device.reset()
    driver = FakeDriver(memory, device, queue_size=8, ram_start=0x80000)
    head = driver.queue(0).add([], [4])
    device.notify(0)
    assert driver.queue(0).take_used() == [(head, 4)]


@pytest.mark.parametrize("field,value", [("desc_table", RAM - 16), ("avail_ring", 3), ("used_ring", RAM + 4096)])
def test_rings_outside_ram_or_misaligned_refuse_activation(memory, field, value):
    device = VirtioRng()
    driver = FakeDriver(memory, device, queue_size=8, activate=False)
    setattr(device.queues[0], field, value)
    device.activate()
    assert device.broken and driver.interrupts.needs_reset


def test_queue_size_must_be_power_of_two(memory):
    with pytest.raises(ValueError):
        SplitQueue(6)
    q = SplitQueue(8)
    q.size = 6
    with pytest.raises(VirtqueueBroken):
        q.activate(memory, event_idx=False, indirect=False)


def test_device_writes_are_reported_for_the_software_cpu(memory):
    seen = []
    memory.on_device_writes = seen.extend
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    head = q.add([], [6, 10])
    device.notify(0)
    assert [n for _, n in seen] == [6, 10]
    assert [a for a, _ in seen] == [a for a, _ in q.writable[head]]


def test_device_writes_of_adjacent_buffers_are_reported_once(memory):
    """push_many() (a received frame's pieces) reports each run of adjacent buffers it wrote
    once, and only the bytes written."""
    seen = []
    memory.on_device_writes = seen.extend
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    base = q.allocator.alloc(0x3000, 0x1000)
    buffers = [(base, 0x1000), (base + 0x1000, 0x1000), (base + 0x2800, 0x800)]  # a gap before the third
    heads = []
    for address, length in buffers:
        head = q.next_free
        q.put_descriptor(head, address, length, VIRTQ_DESC_F_WRITE)
        q.next_free += 1
        q.publish(head)
        heads.append(head)
    queue = device.queues[0]
    chains = [queue.pop() for _ in buffers]
    queue.push_many([(chains[0], 0x1000), (chains[1], 0x1000), (chains[2], 0x100)])
    assert seen == [(base, 0x2000), (base + 0x2800, 0x100)]
    assert q.take_used() == [(heads[0], 0x1000), (heads[1], 0x1000), (heads[2], 0x100)]


def test_a_request_returned_twice_or_after_a_reset_is_kept_from_the_driver(memory, caplog):
    """The driver would find its ring corrupt (Linux: "id N is not a head!"): the device's second
    return is logged and dropped, and the driver sees the request once."""
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    head = q.add([], [4])
    queue = device.queues[0]
    chain = queue.pop()
    queue.push(chain, 4)
    with caplog.at_level("ERROR", logger="pyvmm.devices.virtio.queue"):
        queue.push(chain, 4)
    assert q.take_used() == [(head, 4)]
    assert queue.stray_completions == 1 and f"descriptor {head}, which it does not hold" in caplog.text
    q.add([], [4])
    held = queue.pop()
    queue.reset()
    queue.push(held, 4)   # taken before the reset: the ring it came from is gone
    assert queue.stray_completions == 1 and queue.used_idx == 0   # (a reset queue counts afresh)


class IndexWatchingMemory(GuestMemory):
    """Records the values written as a u16 at `watched` (the queue is compiled: its memory's
    methods cannot be replaced on an instance, but a subclass may override them)."""

    def watch(self, address):
        self.watched, self.index_writes = address, []

    def write_u16(self, address, value):
        if address == getattr(self, "watched", None):
            self.index_writes.append(value)
        super().write_u16(address, value)


def test_push_many_publishes_the_used_index_once_after_every_element():
    """A merged frame's buffers reach the driver together: the index moves once, past all of
    them, and a chain the device does not hold is left out without losing the others."""
    with IndexWatchingMemory.from_specs([RegionSpec(0, RAM)]) as memory:
        _push_many_with_a_stray_chain(memory)


def _push_many_with_a_stray_chain(memory):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    heads = [q.add([], [8]) for _ in range(3)]
    queue = device.queues[0]
    chains = [queue.pop() for _ in heads]
    memory.watch(queue.used_ring + 2)
    queue.push_many([(chains[0], 8), (chains[1], 5), (chains[0], 8), (chains[2], 1)])
    assert memory.index_writes == [3]
    assert q.take_used() == [(heads[0], 8), (heads[1], 5), (heads[2], 1)]
    assert queue.stray_completions == 1


def test_avail_event_follows_the_last_entry_taken_once_the_device_caught_up(memory):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    for _ in range(3):
        q.add([], [1])
    queue = device.queues[0]
    queue.pop()
    assert q.avail_event() == 0   # entries it saw are still to take: no kick is needed for more
    queue.pop()
    queue.pop()
    assert q.avail_event() == 3   # caught up: kick me at the next entry
    assert queue.pop() is None and q.avail_event() == 3


def test_save_restore_keeps_ring_positions(memory):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    q.add([], [1])
    device.notify(0)
    state = through_json(device.save())
    clone = VirtioRng(source=counting_source())
    clone.attach(memory, driver.interrupts)
    clone.restore(state)
    assert clone.save() == state
    head = q.add([], [1])
    clone.notify(0)
    assert q.take_used()[-1] == (head, 1)


def test_a_queue_restored_mid_stream_continues_with_the_next_available_descriptor(memory):
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    heads = [q.add([], [2]) for _ in range(3)]
    queue = device.queues[0]
    served = queue.pop()                 # the device took the first request and finished it
    queue.push(served, 0)
    held = queue.pop()                   # ... and holds the second, as a receive buffer waits for data
    assert (served.head, held.head) == tuple(heads[:2])
    state = through_json(queue.save())
    assert state.in_flight == (heads[1],) and state.last_avail == 2 and state.used_idx == 1

    fresh = SplitQueue(8)
    fresh.restore(state)
    fresh.memory = memory
    assert fresh.save() == state
    again = fresh.pop()                  # the request in flight comes back first, then the next one
    assert (again.head, again.writable) == (held.head, held.writable)
    following = fresh.pop()
    assert following.head == heads[2] and fresh.pop() is None
    fresh.push(following, 2)
    fresh.push(again, 1)
    assert fresh.in_flight == () and (fresh.last_avail, fresh.used_idx) == (3, 3)


def test_queue_state_is_checked(memory):
    queue = SplitQueue(8)
    good = queue.save()
    with pytest.raises(StateError, match="in_flight: 0 heads, but the device took 2 requests"):
        changed(good, last_avail=2)
    with pytest.raises(StateError, match=r"in_flight\[0\]: 9 is outside 0..7"):
        changed(good, size=8, last_avail=1, in_flight=(9,))
    with pytest.raises(StateError, match="in_flight: a head is listed twice"):
        changed(good, size=8, last_avail=2, in_flight=(1, 1))
    queue.check_restorable(changed(good, size=6, ready=True))   # a driver may write anything until DRIVER_OK
    with pytest.raises(StateError, match="size: queue 0: 16 entries in use, the device serves powers of two up to 8"):
        queue.check_restorable(changed(good, size=16, ready=True), "queue 0", in_use=True)
    with pytest.raises(StateError, match="size: queue 0: 6 entries in use"):
        queue.check_restorable(changed(good, size=6, ready=True), "queue 0", in_use=True)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(["add", "pop", "push"]), max_size=40))
def test_any_queue_state_round_trips(memory, ops):
    device, driver = rng_with_driver(memory)
    q, queue = driver.queue(0), device.queues[0]
    held, added = [], 0
    for op in ops:
        if op == "add" and added < 8:   # each descriptor once: this driver does not recycle them
            q.add([], [1])
            added += 1
        elif op == "pop" and (chain := queue.pop()) is not None:
            held.append(chain)
        elif op == "push" and held:
            queue.push(held.pop(0), 0)
    state = queue.save()
    assert state.in_flight == tuple(chain.head for chain in held)
    fresh = SplitQueue(8)
    fresh.restore(through_json(state))
    assert fresh.save() == state


# Buffers start above the rings (a driver pointing buffers at its own rings only hurts itself),
# and may run past the end of RAM.
descriptor = st.tuples(
    st.integers(0x20000, RAM + 8192), st.integers(0, 1 << 20), st.integers(0, 7), st.integers(0, 20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(descriptor, min_size=1, max_size=16), heads=st.lists(st.integers(0, 20), min_size=1, max_size=10),
       avail_idx=st.integers(0, 0xFFFF))
def test_random_rings_never_escape_or_raise(memory, descs, heads, avail_idx):
    memory.fill(0, RAM)
    device, driver = rng_with_driver(memory)
    q = driver.queue(0)
    for i, (address, length, flags, nxt) in enumerate(descs[:8]):
        q.put_descriptor(i, address, length, flags, nxt)
    for head in heads:
        q.publish(head)
    if avail_idx % 3 == 0:
        q.set_avail_idx(avail_idx)
    device.notify(0)  # must not raise: a bad request is dropped, a bad ring breaks the device
    used = q.take_used()
    assert len(used) <= q.size
    for head, written in used:
        assert head < 8 and written <= 1 << 20


def test_a_broken_device_does_not_disturb_another(memory):
    hostile, hostile_driver = rng_with_driver(memory)
    other = VirtioRng(source=counting_source())
    other_driver = FakeDriver(memory, other, queue_size=8, ram_start=0x80000)
    hostile_driver.queue(0).set_avail_idx(0x8000)
    hostile.notify(0)
    head = other_driver.queue(0).add([], [8])
    other.notify(0)
    assert hostile.broken and not other.broken
    assert other_driver.queue(0).take_used() == [(head, 8)]
