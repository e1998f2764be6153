"""virtio-balloon against a fake driver: inflated and reported pages leave host RAM (mincore),
statistics, the target in the configuration space, queue numbering, state round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.state import through_json
from helpers.virtio_driver import FakeDriver
from pyvmm.devices.virtio.balloon import F_DEFLATE_ON_OOM, F_PAGE_REPORTING, F_STATS_VQ, VirtioBalloon
from pyvmm.devices.virtio.device import COMMON_FEATURES
from pyvmm.memory import GuestMemory
from pyvmm.memory.backing import Backing
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE

MIB = 1 << 20
PAGE = 4096


def _memory(backing: Backing = Backing()) -> GuestMemory:
    return GuestMemory.from_specs([RegionSpec(0, 16 * MIB)], backing)


def _touch(memory: GuestMemory, start: int, length: int) -> None:
    for address in range(start, start + length, PAGE):
        memory.write_u8(address, 0x5A)


def _pfns(start: int, count: int) -> bytes:
    return struct.pack(f"<{count}I", *range(start >> 12, (start >> 12) + count))


@pytest.mark.parametrize("backing", [Backing(), Backing(mergeable=True)], ids=["memfd", "anonymous"])
def test_inflate_returns_the_pages_to_the_host_and_drops_translated_code(backing):
    with _memory(backing) as memory:
        device = VirtioBalloon()
        driver = FakeDriver(memory, device)
        dropped: list[tuple[int, int]] = []
        memory.on_device_writes = dropped.extend
        _touch(memory, 8 * MIB, 4 * MIB)
        region = memory.regions[0]
        # two buffers of 256 PFNs (1 MiB each), as Linux sends them, over 8 MiB..10 MiB
        for part in range(2):
            driver.queue(0).add([_pfns(8 * MIB + part * MIB, 256)], [])
        before = region.resident_bytes()
        device.notify(0)
        assert len(driver.queue(0).take_used()) == 2
        assert before - region.resident_bytes() >= 2 * MIB
        assert memory.read(8 * MIB, 2 * MIB) == bytes(2 * MIB)       # the pages read back as zero
        assert memory.read_u8(10 * MIB) == 0x5A                      # the rest is untouched
        assert (8 * MIB, MIB) in dropped and (9 * MIB, MIB) in dropped  # the software CPU forgets their code
        assert device.stats()["inflated_pages"] == 512
        assert device.stats()["inflate_freed_bytes"] == 2 * MIB


def test_deflate_only_counts_and_pfns_outside_ram_are_ignored():
    with _memory() as memory:
        device = VirtioBalloon()
        driver = FakeDriver(memory, device)
        _touch(memory, 4 * MIB, MIB)
        driver.queue(1).add([_pfns(4 * MIB, 16)], [])
        device.notify(1)
        driver.queue(0).add([_pfns(64 * MIB, 4)], [])  # beyond the 16 MiB of RAM
        device.notify(0)
        assert memory.read_u8(4 * MIB) == 0x5A
        assert device.stats()["deflated_pages"] == 16 and device.stats()["inflate_freed_bytes"] == 0
        assert device.broken is None


def _report(driver: FakeDriver, queue_index: int, ranges: list[tuple[int, int]]) -> int:
    """A page-reporting request: device-writable descriptors naming free ranges (as Linux adds them)."""
    queue = driver.queue(queue_index)
    head = queue.next_free
    for i, (address, length) in enumerate(ranges):
        more = 1 if i + 1 < len(ranges) else 0
        queue.put_descriptor((head + i) % queue.size, address, length, VIRTQ_DESC_F_WRITE | more,
                             (head + i + 1) % queue.size)
    queue.next_free = (head + len(ranges)) % queue.size
    queue.publish(head)
    return head


def test_free_page_reporting_discards_the_reported_ranges():
    with _memory() as memory:
        device = VirtioBalloon(free_page_reporting=True)
        driver = FakeDriver(memory, device)
        assert device.queue_role(3) == "reporting"
        _touch(memory, 4 * MIB, 8 * MIB)
        head = _report(driver, 3, [(4 * MIB, 2 * MIB), (8 * MIB, 4 * MIB)])
        before = memory.regions[0].resident_bytes()
        device.notify(3)
        assert driver.queue(3).take_used() == [(head, 0)]
        assert before - memory.regions[0].resident_bytes() >= 6 * MIB
        assert memory.read_u8(6 * MIB) == 0x5A and memory.read_u8(8 * MIB) == 0
        assert device.stats()["reported_bytes"] == 6 * MIB and device.stats()["reports"] == 1


def test_queues_are_numbered_by_the_features_the_driver_took():
    with _memory() as memory:
        device = VirtioBalloon(free_page_reporting=True)
        FakeDriver(memory, device, features=COMMON_FEATURES | F_PAGE_REPORTING)  # no statsq
        assert [device.queue_role(i) for i in range(4)] == ["inflate", "deflate", "reporting", None]


def _stats_buffer(pairs: dict[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in pairs.items())


def test_statistics_are_read_kept_parked_and_requested_again_by_the_timer():
    armed: list[int | None] = []
    with _memory() as memory:
        device = VirtioBalloon(stats_interval_s=5, timer=armed.append)
        driver = FakeDriver(memory, device)
        assert armed and armed[-1] is not None  # DRIVER_OK starts the polling
        driver.queue(2).add([_stats_buffer({4: 100 * MIB, 5: 256 * MIB, 6: 120 * MIB, 7: 9 * MIB, 99: 1})], [])
        device.notify(2)
        assert driver.queue(2).take_used() == []  # the device keeps the buffer
        stats = device.statistics()
        assert (stats["free_memory"], stats["total_memory"], stats["available_memory"], stats["disk_caches"]) == \
            (100 * MIB, 256 * MIB, 120 * MIB, 9 * MIB)
        device.poll_stats()
        assert len(driver.queue(2).take_used()) == 1  # handed back: the driver refills it
        assert 2 in driver.interrupts.used
        device.set_stats_interval(0)
        assert armed[-1] is None


def test_target_is_in_the_config_space_and_actual_is_the_drivers():
    with _memory() as memory:
        device = VirtioBalloon(target_pages=256)
        driver = FakeDriver(memory, device)
        assert struct.unpack("<II", device.read_config(0, 8)) == (256, 0)
        device.set_target_pages(1024)
        assert driver.interrupts.config == 1
        assert struct.unpack("<I", device.read_config(0, 4)) == (1024,)
        device.write_config(4, struct.pack("<I", 1000))
        device.write_config(0, struct.pack("<I", 7))  # num_pages is the device's: ignored
        assert device.statistics()["actual_pages"] == 1000 and device.statistics()["actual_mib"] == 3
        assert device.statistics()["target_pages"] == 1024
        with pytest.raises(ValueError):
            device.set_target_pages((16 * MIB >> 12) + 1)
        with pytest.raises(ValueError):
            device.set_target_pages(-1)


def test_features_offered_follow_the_options():
    assert VirtioBalloon().offered_features & (F_DEFLATE_ON_OOM | F_PAGE_REPORTING) == 0
    both = VirtioBalloon(deflate_on_oom=True, free_page_reporting=True).offered_features
    assert both & F_DEFLATE_ON_OOM and both & F_PAGE_REPORTING and both & F_STATS_VQ
    assert len(VirtioBalloon(free_page_reporting=True).queues) == 4 and len(VirtioBalloon().queues) == 3


def test_a_restored_balloon_hands_the_parked_stats_buffer_back():
    with _memory() as memory:
        device = VirtioBalloon(target_pages=64, stats_interval_s=1)
        driver = FakeDriver(memory, device)
        driver.queue(2).add([_stats_buffer({4: 5 * MIB})], [])
        device.notify(2)
        device.write_config(4, struct.pack("<I", 64))
        state = through_json(device.save())
        clone = VirtioBalloon(stats_interval_s=1)
        clone.attach(memory, driver.interrupts)
        clone.restore(state)
        assert clone.save() == state
        assert clone.statistics()["free_memory"] == 5 * MIB and clone.statistics()["actual_pages"] == 64
        clone.poll_stats()
        assert len(driver.queue(2).take_used()) == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.tuples(st.sampled_from([0, 1, 2, 3]),
                                   st.lists(st.integers(0, (16 * MIB >> 12) + 8), max_size=8)), max_size=8),
       target=st.integers(0, 16 * MIB >> 12))
def test_any_balloon_state_round_trips(requests, target):
    with _memory() as memory:
        device = VirtioBalloon(free_page_reporting=True)
        driver = FakeDriver(memory, device, queue_size=16)
        device.set_target_pages(target)
        for queue_index, pfns in requests:
            if queue_index == 3:
                _report(driver, 3, [(pfn << 12, 2 * MIB) for pfn in pfns[:2]] or [(0, 0)])
            else:
                driver.queue(queue_index).add([struct.pack(f"<{len(pfns)}I", *pfns)], [])
            device.notify(queue_index)
        state = device.save()
        clone = VirtioBalloon(free_page_reporting=True)
        clone.attach(memory, driver.interrupts)
        clone.restore(through_json(state))
        assert clone.save() == state


def test_a_state_with_features_this_balloon_does_not_offer_is_refused():
    from pyvmm.persist import StateError

    with _memory() as memory:
        device = VirtioBalloon(free_page_reporting=True)
        FakeDriver(memory, device)
        state = device.save()
        with pytest.raises(StateError):
            VirtioBalloon().restore(state)
