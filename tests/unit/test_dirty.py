"""Dirty-page tracking: DirtyBitmap's operations, and HostWriteTracker on a bare GuestMemory
(every write through the process's mapping is seen, by any path; nothing else is reported;
collecting starts over)."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings, strategies as st

from pyvmm.memory.dirty import (PAGE_SIZE, DeviceWriteLog, DirtyBitmap, DirtyRate, DirtyTrackingUnavailable, HostWriteTracker,
                                host_tracking_problem)
from pyvmm.memory.guest_memory import GuestMemory, RegionSpec

LOW = RegionSpec(0, 2 << 20)                # 512 pages
HIGH = RegionSpec(0x100000000, 1 << 20)     # 256 pages at 4 GiB
LAYOUT = {LOW.guest_base: LOW.size, HIGH.guest_base: HIGH.size}

needs_host_tracking = pytest.mark.skipif(host_tracking_problem() is not None,
                                         reason=f"{host_tracking_problem()}")


# --- DirtyBitmap ------------------------------------------------------------------------------

def test_a_new_bitmap_is_clean_and_full_has_every_page():
    empty = DirtyBitmap(LAYOUT)
    assert empty.count() == 0 and not empty and list(empty.pages()) == []
    with GuestMemory.from_specs([LOW, HIGH]) as memory:
        full = DirtyBitmap.full(memory)
    pages = list(full.pages())
    assert full.count() == len(pages) == 768
    assert pages == [i * PAGE_SIZE for i in range(512)] + [HIGH.guest_base + i * PAGE_SIZE for i in range(256)]


def test_full_of_a_region_with_pages_not_a_multiple_of_eight():
    bitmap = DirtyBitmap.full(_FakeMemory({0: 5 * PAGE_SIZE}))
    assert list(bitmap.pages()) == [i * PAGE_SIZE for i in range(5)]
    assert bitmap.regions[0] == bytearray([0b11111])


def test_mark_sets_every_page_the_range_touches_lsb_first():
    bitmap = DirtyBitmap(LAYOUT)
    bitmap.mark(0x1FFF, 2)  # the last byte of page 1 and the first of page 2
    bitmap.mark(HIGH.guest_base + 8 * PAGE_SIZE)
    assert list(bitmap.pages()) == [0x1000, 0x2000, HIGH.guest_base + 0x8000]
    assert bitmap.regions[0][0] == 0b110 and bitmap.regions[HIGH.guest_base][1] == 0b1
    assert 0x2FFF in bitmap and 0x3000 not in bitmap


def test_mark_outside_ram_or_across_a_region_end_is_refused():
    bitmap = DirtyBitmap(LAYOUT)
    with pytest.raises(ValueError, match="outside guest RAM"):
        bitmap.mark(LOW.size)
    with pytest.raises(ValueError, match="crosses"):
        bitmap.mark(LOW.size - 1, 2)


def test_merge_ors_and_refuses_another_layout():
    a, b = DirtyBitmap(LAYOUT), DirtyBitmap(LAYOUT)
    a.mark(0)
    b.mark(0x5000)
    b.mark(HIGH.guest_base)
    assert a.merge(b) is a
    assert list(a.pages()) == [0, 0x5000, HIGH.guest_base]
    with pytest.raises(ValueError, match="different RAM layouts"):
        a.merge(DirtyBitmap({0: LOW.size}))


def test_merge_words_takes_kvm_s_layout():
    bitmap = DirtyBitmap({0: 100 * PAGE_SIZE})  # 13 bytes; KVM hands two 64-bit words
    words = (1 << 0 | 1 << 63 | 1 << 99).to_bytes(16, "little")
    bitmap.merge_words(0, words)
    assert list(bitmap.pages()) == [0, 63 * PAGE_SIZE, 99 * PAGE_SIZE]
    assert len(bitmap.regions[0]) == 13


def test_ranges_join_contiguous_pages():
    bitmap = DirtyBitmap(LAYOUT)
    for page in (3, 4, 5, 9, 511):
        bitmap.mark(page * PAGE_SIZE)
    bitmap.mark(HIGH.guest_base)
    assert list(bitmap.ranges()) == [(0x3000, 0x3000), (0x9000, 0x1000), (511 * PAGE_SIZE, 0x1000),
                                     (HIGH.guest_base, 0x1000)]


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 767)), st.sets(st.integers(0, 767)))
def test_pages_count_and_merge_agree_with_sets(first, second):
    def address(index: int) -> int:
        return index * PAGE_SIZE if index < 512 else HIGH.guest_base + (index - 512) * PAGE_SIZE

    a, b = DirtyBitmap(LAYOUT), DirtyBitmap(LAYOUT)
    for index in first:
        a.mark(address(index))
    for index in second:
        b.mark(address(index))
    assert list(a.pages()) == sorted(address(i) for i in first)
    assert a.count() == len(first)
    assert list(a.copy().merge(b).pages()) == sorted(address(i) for i in first | second)
    assert sum(length for _, length in a.ranges()) == len(first) * PAGE_SIZE


def test_dirty_rate_is_pages_over_the_window():
    rate = DirtyRate(window=10)
    rate.start(now=100.0)
    assert rate.pages_per_second() is None
    rate.add(300, now=101.0)
    rate.add(100, now=102.0)
    assert rate.pages_per_second() == pytest.approx(200.0)
    rate.add(0, now=200.0)  # the old samples leave the window
    assert rate.pages_per_second() == pytest.approx(0.0)


class _FakeRegion:
    def __init__(self, base: int, size: int) -> None:
        self.guest_base, self.size = base, size


class _FakeMemory:
    def __init__(self, layout: dict[int, int]) -> None:
        self.regions = [_FakeRegion(b, s) for b, s in layout.items()]


# --- HostWriteTracker on a bare GuestMemory ------------------------------------------------------

@pytest.fixture
def tracked():
    with GuestMemory.from_specs([LOW, HIGH]) as memory:
        memory.write(0x10000, b"populated before tracking")  # a page already present
        tracker = HostWriteTracker(memory)
        try:
            yield memory, tracker
        finally:
            tracker.close()


@needs_host_tracking
def test_nothing_written_nothing_reported(tracked):
    memory, tracker = tracked
    memory.read(0, 0x8000)  # reads are not writes
    assert list(tracker.collect().pages()) == []


@needs_host_tracking
def test_writes_through_every_memory_path_are_seen_and_collect_starts_over(tracked):
    memory, tracker = tracked
    memory.write_u8(0x10000, 1)                     # populated page
    memory.write_u32(0x20004, 7)                    # never-touched page
    memory.write_u64(HIGH.guest_base + 0x3008, 9)   # the second region
    memory.fill(0x40000, 3 * PAGE_SIZE, 0xAA)
    memory.write(0x7FFFF, b"ab")                    # across a page boundary
    view = memory.view(0x90000, 16)                 # zero-copy, as virtio devices write
    view[:4] = b"zero"
    assert list(tracker.collect().pages()) == [0x10000, 0x20000, 0x40000, 0x41000, 0x42000, 0x7F000, 0x80000,
                                                0x90000, HIGH.guest_base + 0x3000]
    assert list(tracker.collect().pages()) == []   # collected: starts over
    memory.write_u8(0x10000, 2)                     # written again after collect: seen again
    assert list(tracker.collect().pages()) == [0x10000]


@needs_host_tracking
def test_the_kernel_filling_a_read_buffer_and_other_threads_are_seen(tracked, tmp_path):
    memory, tracker = tracked
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(2 * PAGE_SIZE))
    fd = os.open(disk, os.O_RDONLY)
    try:  # what virtio-blk does: preadv into views of guest RAM
        os.preadv(fd, [memory.view(0x30000, PAGE_SIZE), memory.view(HIGH.guest_base, PAGE_SIZE)], 0)
    finally:
        os.close(fd)
    writer = threading.Thread(target=memory.write_u32, args=(0x50000, 5))
    writer.start()
    writer.join()
    assert list(tracker.collect().pages()) == [0x30000, 0x50000, HIGH.guest_base]


@needs_host_tracking
def test_collect_ors_into_a_given_bitmap(tracked):
    memory, tracker = tracked
    bitmap = DirtyBitmap.empty(memory)
    bitmap.mark(0x1000)
    memory.write_u8(0x2000, 1)
    assert tracker.collect(into=bitmap) is bitmap
    assert list(bitmap.pages()) == [0x1000, 0x2000]


@needs_host_tracking
def test_after_close_writes_work_and_a_new_tracker_starts_clean():
    with GuestMemory.from_specs([LOW]) as memory:
        tracker = HostWriteTracker(memory)
        memory.write_u8(0x1000, 1)
        tracker.close()
        tracker.close()  # twice is harmless
        memory.write_u8(0x2000, 2)
        assert memory.read_u8(0x2000) == 2
        with pytest.raises(RuntimeError, match="stopped"):
            tracker.collect()
        again = HostWriteTracker(memory)
        try:
            assert list(again.collect().pages()) == []
            memory.write_u8(0x3000, 3)
            assert list(again.collect().pages()) == [0x3000]
        finally:
            again.close()


def test_a_host_without_tracking_is_refused_with_one_line(monkeypatch):
    from pyvmm.memory import userfaultfd

    monkeypatch.setattr(userfaultfd, "available_features", lambda **_: userfaultfd.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    with GuestMemory.from_specs([LOW]) as memory:
        with pytest.raises(DirtyTrackingUnavailable) as caught:
            HostWriteTracker(memory)
    message = str(caught.value)
    assert "\n" not in message and "UFFD_FEATURE_WP_ASYNC" in message and "6.1" in message


# --- DeviceWriteLog: KVM on a host without write-protection tracking -----------------------------

def test_device_write_log_has_the_buffers_a_device_filled_and_its_used_rings():
    from helpers.virtio_driver import FakeDriver
    from pyvmm.devices.virtio.rng import VirtioRng

    with GuestMemory.from_specs([LOW]) as memory:
        device = VirtioRng(source=lambda n: b"\x5a" * n)
        driver = FakeDriver(memory, device, queue_size=8)
        queue = driver.queue(0)
        used_rings = [(q.used_ring, 6 + 8 * q.size) for q in device.queues if q.ready]
        log = DeviceWriteLog(memory, lambda: used_rings)
        try:
            assert list(log.collect().pages()) == sorted({address & ~0xFFF for address, _ in used_rings})
            queue.allocator.alloc(0x3000, 0x1000)   # the next buffer starts on a fresh page
            head = queue.add([], [5000])            # two pages and a bit: three pages
            memory.write_u32(0x1F0000, 1)           # a write no device reports: the guest's, KVM logs it
            device.notify(0)
            [(done, written)] = queue.take_used()
            assert (done, written) == (head, 5000)
            [(address, _)] = queue.writable[head]
            written_pages = {page & ~0xFFF for page in (address, address + 4096, address + 4999)}
            ring_pages = {ring & ~0xFFF for ring, _ in used_rings}
            assert list(log.collect().pages()) == sorted(written_pages | ring_pages)
        finally:
            log.close()
        assert memory.on_device_writes is None  # the hook it chained is back


def test_device_write_log_chains_the_hook_already_there():
    seen = []
    with GuestMemory.from_specs([LOW]) as memory:
        memory.on_device_writes = seen.extend
        log = DeviceWriteLog(memory, lambda: [])
        memory.on_device_writes([(0x5000, 10)])
        assert seen == [(0x5000, 10)] and list(log.collect().pages()) == [0x5000]
        log.close()
        assert memory.on_device_writes is not None and memory.on_device_writes([(0, 1)]) is None and seen[-1] == (0, 1)
