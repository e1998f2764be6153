"""Rate-limited virtio-blk and virtio-net with a fake clock and fake timers: requests wait in the
ring while the buckets are empty, none is dropped, each refill lets exactly its tokens through,
the limit changes at run time and survives a save/restore."""

import select
import struct
import time

import pytest

from helpers.state import through_json
from helpers.virtio_driver import FakeDriver
from pyvmm.devices.rate_limiter import NS_PER_MS, RateLimit, TokenBucketConfig
from pyvmm.devices.virtio.blk import BlockState, VirtioBlock
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.throttle import ThrottleError
from pyvmm.iothread import IoThread
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.net.tap import FdBackend

T_IN, T_OUT, T_FLUSH = 0, 1, 4
HDR = 12


class FakeClock:
    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: int) -> None:
        self.now += ms * NS_PER_MS


class FakeTimers:
    """Records call_later() requests; fire() runs those due at the fake clock's time."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.pending = clock, []

    def call_later(self, delay_ns, callback):
        entry = [self.clock.now + delay_ns, callback]
        self.pending.append(entry)

        class Handle:
            def cancel(_self):
                entry[1] = None
        return Handle()

    def armed(self) -> list[int]:
        return [due - self.clock.now for due, callback in self.pending if callback is not None]

    def fire(self) -> int:
        due = [e for e in self.pending if e[0] <= self.clock.now and e[1] is not None]
        self.pending = [e for e in self.pending if e not in due]
        for entry in due:
            entry[1]()
        return len(due)


@pytest.fixture
def memory():
    with GuestMemory.from_specs([RegionSpec(0, 4 << 20)]) as mem:
        yield mem


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def timers(clock):
    return FakeTimers(clock)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 512))
    return path


def blk_header(rtype, sector=0):
    return struct.pack("<IIQ", rtype, 0, sector)


def submit_reads(driver, count, sectors=2):
    q = driver.queue(0)
    return [q.add([blk_header(T_IN, i)], [sectors * 512, 1]) for i in range(count)]


def make_disk(memory, image, clock, timers, limit):
    device = VirtioBlock(image, rate_limit=limit, timers=timers, clock=clock, queue_size=16)
    return device, FakeDriver(memory, device, queue_size=16)


def test_block_requests_wait_for_bytes_and_each_refill_lets_its_tokens_through(memory, image, clock, timers):
    # 2 KiB a second in a 2 KiB bucket: two 1 KiB reads a second
    device, driver = make_disk(memory, image, clock, timers, RateLimit(bandwidth=TokenBucketConfig(2048, 1000)))
    heads = submit_reads(driver, 5)
    device.notify(0)
    q = driver.queue(0)
    assert [head for head, _ in q.take_used()] == heads[:2]
    assert timers.armed() == [500 * NS_PER_MS]          # one timer, when the next 1 KiB is there
    device.notify(0)                                     # kicks while throttled change nothing
    assert q.take_used() == [] and len(timers.armed()) == 1
    completed = heads[:2]
    for _ in range(3):
        clock.advance_ms(499)
        assert timers.fire() == 0
        clock.advance_ms(1)
        assert timers.fire() == 1
        got = [head for head, _ in q.take_used()]
        assert len(got) == 1                             # 500 ms bring exactly 1024 bytes: one read
        completed += got
    assert completed == heads                            # all done, in order, none dropped
    assert device.stats()["reads"] == 5 and device.stats()["errors"] == 0
    assert device.stats()["throttled"] >= 2


def test_block_ops_limit_counts_every_request(memory, image, clock, timers):
    device, driver = make_disk(memory, image, clock, timers, RateLimit(ops=TokenBucketConfig(3, 300)))
    q = driver.queue(0)
    heads = [q.add([blk_header(T_FLUSH)], [1]) for _ in range(5)]
    device.notify(0)
    assert [h for h, _ in q.take_used()] == heads[:3]
    assert timers.armed() == [100 * NS_PER_MS]
    clock.advance_ms(100)
    timers.fire()
    assert [h for h, _ in q.take_used()] == heads[3:4]
    clock.advance_ms(100)
    timers.fire()
    assert [h for h, _ in q.take_used()] == heads[4:]
    assert timers.armed() == []


def test_a_request_larger_than_the_bucket_goes_and_the_next_pays_the_debt(memory, image, clock, timers):
    device, driver = make_disk(memory, image, clock, timers, RateLimit(bandwidth=TokenBucketConfig(1024, 1000)))
    heads = submit_reads(driver, 2, sectors=8)           # 4 KiB each under a 1 KiB bucket
    device.notify(0)
    q = driver.queue(0)
    assert [h for h, _ in q.take_used()] == heads[:1]
    assert timers.armed() == [4000 * NS_PER_MS]          # 3 KiB of debt, then a full bucket
    clock.advance_ms(4000)
    timers.fire()
    assert [h for h, _ in q.take_used()] == heads[1:]


def test_changing_the_limit_at_run_time_resumes_deferred_requests(memory, image, clock, timers):
    device, driver = make_disk(memory, image, clock, timers, RateLimit(ops=TokenBucketConfig(1, 1000)))
    heads = submit_reads(driver, 3)
    device.notify(0)
    q = driver.queue(0)
    assert len(q.take_used()) == 1
    device.set_rate_limit(None)                          # lifted: the deferred requests go at once
    assert timers.armed() == [0]
    timers.fire()
    assert [h for h, _ in q.take_used()] == heads[1:]
    device.set_rate_limit(RateLimit(ops=TokenBucketConfig(1, 1000)))
    assert device.throttle.limit == RateLimit(ops=TokenBucketConfig(1, 1000))


def test_a_throttled_disk_saves_its_levels_and_the_restored_one_finishes_the_requests(memory, image, clock, timers):
    limit = RateLimit(bandwidth=TokenBucketConfig(2048, 1000))
    device, driver = make_disk(memory, image, clock, timers, limit)
    heads = submit_reads(driver, 4)
    device.notify(0)
    q = driver.queue(0)
    assert len(q.take_used()) == 2
    clock.advance_ms(250)                                # a quarter of a refill: 512 bytes
    state = through_json(device.save())
    assert isinstance(state, BlockState) and state.rate_limiter.bandwidth.budget == 512
    assert state.virtio.queues[0].in_flight == ()        # the held requests are still in the ring
    device.close()

    other_timers = FakeTimers(clock)
    other = VirtioBlock(image, timers=other_timers, clock=clock, queue_size=16)   # started without a limit
    other.attach(memory, driver.interrupts)
    other.restore(state)
    assert other.throttle.limit == limit
    assert other_timers.armed() == [0]                   # looks at its queue once the I/O thread runs
    other_timers.fire()
    assert q.take_used() == []                           # 512 bytes are not a 1 KiB read
    clock.advance_ms(250)
    other_timers.fire()
    assert [h for h, _ in q.take_used()] == heads[2:3]
    other.close()


def test_a_version_1_block_state_reads_as_unlimited(memory, image, clock, timers):
    device, _ = make_disk(memory, image, clock, timers, None)
    data = device.save().to_dict()
    del data["fields"]["rate_limiter"]
    data["version"] = 1
    assert BlockState.from_dict(data).rate_limiter is None
    device.close()


def test_a_limit_without_timers_is_refused(image):
    with pytest.raises(ThrottleError):
        VirtioBlock(image, rate_limit=RateLimit(ops=TokenBucketConfig(1, 1000)))


# --- virtio-net ------------------------------------------------------------------------------------------

def test_net_tx_waits_for_packets_and_sends_every_frame(memory, wire, clock, timers):
    io = IoThread(name="test-io")   # not started: RX is not used here
    device = VirtioNet(FdBackend(wire[0].fileno()), mac=bytes.fromhex("525400123456"), iothread=io, queue_size=16,
                       tx_rate_limit=RateLimit(bandwidth=TokenBucketConfig(3000, 1000),
                                               ops=TokenBucketConfig(100, 1000)),
                       timers=timers, clock=clock)
    driver = FakeDriver(memory, device)
    q = driver.queue(1)
    frames = [bytes([i]) * 1000 for i in range(5)]
    heads = [q.add([bytes(HDR) + f], []) for f in frames]
    device.notify(1)
    assert [h for h, _ in q.take_used()] == heads[:3]     # 3000 bytes: three 1000-byte frames
    assert timers.armed() == [1000 * NS_PER_MS // 3 + 1]  # 1000 tokens at 3 a ms, rounded up
    clock.advance_ms(1000)
    timers.fire()
    assert [h for h, _ in q.take_used()] == heads[3:]
    sent = []
    while select.select([wire[1]], [], [], 0)[0]:
        sent.append(wire[1].recv(4096)[HDR:])
    assert sent == frames
    assert device.stats()["tx_packets"] == 5 and device.stats()["tx_dropped"] == 0
    io.stop()


def test_net_rx_stops_reading_while_the_bucket_is_empty_and_loses_nothing(memory, wire, iothread):
    """On a real I/O thread and clock: 1 packet per 100 ms; the host sends 4 at once."""
    device = VirtioNet(FdBackend(wire[0].fileno()), mac=bytes.fromhex("525400123456"), iothread=iothread,
                       queue_size=16, rx_rate_limit=RateLimit(ops=TokenBucketConfig(1, 100)))
    driver = FakeDriver(memory, device)
    q = driver.queue(0)
    heads = [q.add([], [HDR + 1514]) for _ in range(8)]
    device.notify(0)
    for i in range(4):
        wire[1].send(bytes(HDR) + bytes([i]) * 100)
    received = []
    deadline = time.monotonic() + 10
    while len(received) < 4 and time.monotonic() < deadline:
        received += q.take_used()
        time.sleep(0.01)
    assert [h for h, _ in received] == heads[:4]
    assert [q.written(h)[HDR] for h, _ in received] == [0, 1, 2, 3]   # in order, none dropped
    stats = device.stats()
    assert stats["rx_packets"] == 4 and stats["rx_dropped"] == 0
    assert stats["rx_throttled"] >= 1                     # it had to wait for tokens at least once
    # the bucket held: 4 packets at 1 per 100 ms after the first took at least 300 ms of refill
    state = device.save()
    assert state.rx_rate_limiter is not None and state.rx_rate_limiter.ops.budget <= 1


def test_a_throttled_disk_served_in_place_sends_what_it_completed_and_asks_for_kicks_again(memory, image, clock, timers):
    """The software CPU serves a disk's kick in the slice that made it (inline_kicks.py): requests
    the limit holds back wait for the refill as ever, the completed ones are signalled when the
    slice ends, and the queue asks for kicks again then."""
    device, driver = make_disk(memory, image, clock, timers, RateLimit(ops=TokenBucketConfig(2, 1000)))
    heads = submit_reads(driver, 3)
    q = driver.queue(0)
    assert device.serve_in_place(0)
    assert [head for head, _ in q.take_used()] == heads[:2] and driver.interrupts.used == []
    assert len(timers.armed()) == 1                      # the third waits for the refill
    device.finish_in_place()                             # the slice's end
    assert driver.interrupts.used == [0] and not device.queues[0].kicks_held
    assert not device.queues[0].kicks_suppressed
    q.set_used_event(2)                                  # the guest's handler saw both
    clock.advance_ms(500)
    timers.fire()
    assert [head for head, _ in q.take_used()] == heads[2:] and driver.interrupts.used == [0, 0]
