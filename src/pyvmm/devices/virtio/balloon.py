"""virtio-balloon (virtio 1.2 section 5.5): guest memory handed back to the host.

Queues, in order, those whose feature the driver took (Linux numbers them densely):
inflateq and deflateq always, statsq with STATS_VQ, reporting_vq with PAGE_REPORTING.

- inflate: the driver gives pages (4 KiB page frame numbers) to the balloon; pyvmm
  discards them (GuestMemory.discard: a hole punched in the memfd, or the private pages
  dropped), so the host's resident memory for the VM falls, and code the software CPU
  translated from them is dropped. deflate: the driver takes pages back; they fill with
  zeroes on the next touch, nothing to do (MUST_TELL_HOST is not offered).
- stats: the driver parks one buffer holding its memory statistics; handing it back asks
  for fresh ones. A timer (every `stats_interval_s` seconds, 0 = never) does that.
- free page reporting: the driver reports free ranges (2 MiB and up) without a balloon
  target; each is discarded as an inflated page would be, and the buffer handed back.
- deflate on OOM: offered when asked; it only tells the driver it may deflate by itself
  when the guest runs out of memory (its OOM notifier), so the target is a wish.

The host sets the target (`set_target_pages`) and reads `actual` (written by the driver in
the configuration space) and the statistics.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Callable

from ...persist import State, require
from .device import VIRTIO_ID_BALLOON, VirtioDevice, VirtioDeviceState
from .queue import DescriptorChain

QUEUE_SIZE = 256
PAGE_SHIFT = 12  # VIRTIO_BALLOON_PFN_SHIFT: PFNs count 4 KiB pages whatever the guest's page size
PAGE_SIZE = 1 << PAGE_SHIFT

F_STATS_VQ = 1 << 1
F_DEFLATE_ON_OOM = 1 << 2
F_PAGE_REPORTING = 1 << 5

INFLATE, DEFLATE, STATS, REPORTING = "inflate", "deflate", "stats", "reporting"

# struct virtio_balloon_stat: le16 tag, le64 value, packed. Names as Firecracker's API has them.
_STAT = struct.Struct("<HQ")
STAT_NAMES = {0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory",
              5: "total_memory", 6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations",
              9: "hugetlb_failures"}
_CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val


class VirtioBalloon(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    name = "virtio-balloon"

    def __init__(self, *, target_pages: int = 0, deflate_on_oom: bool = False, free_page_reporting: bool = False,
                 stats_interval_s: int = 0, timer: Callable[[int | None], None] | None = None) -> None:
        features = F_STATS_VQ | (F_DEFLATE_ON_OOM if deflate_on_oom else 0) | \
            (F_PAGE_REPORTING if free_page_reporting else 0)
        super().__init__((QUEUE_SIZE,) * (4 if free_page_reporting else 3), features)
        self.target_pages = target_pages
        self.actual_pages = 0
        self.stats_interval_s = stats_interval_s
        # arms a callback to poll_stats() at a time.time_ns() deadline (None cancels); the
        # builder's timer calls back on the I/O thread
        self._timer = timer or (lambda deadline: None)
        self._stats_chain: DescriptorChain | None = None  # the buffer the driver parked on statsq
        self.guest_stats: dict[str, int] = {}
        self.stats_updated_ns = 0  # time.time_ns() of the last statistics, 0: none yet
        self.tally = {"inflated_pages": 0, "deflated_pages": 0, "inflate_freed_bytes": 0,
                          "reported_bytes": 0, "reports": 0, "stats_updates": 0}

    # --- queues -------------------------------------------------------------------------------------

    def queue_role(self, index: int) -> str | None:
        roles = [INFLATE, DEFLATE]
        if self.has_feature(F_STATS_VQ):
            roles.append(STATS)
        if self.has_feature(F_PAGE_REPORTING):
            roles.append(REPORTING)
        return roles[index] if index < len(roles) else None

    def process_queue(self, queue_index: int) -> None:
        role = self.queue_role(queue_index)
        if role in (INFLATE, DEFLATE):
            self._balloon(queue_index, role == INFLATE)
        elif role == STATS:
            self._take_stats()
        elif role == REPORTING:
            self._reported(queue_index)

    def _balloon(self, queue_index: int, inflate: bool) -> None:
        queue = self.queues[queue_index]
        while (chain := queue.pop()) is not None:
            frames = bytearray()
            for address, length in chain.readable:
                frames += self.memory.read(address, length)
            pfns = struct.unpack_from(f"<{len(frames) // 4}I", frames)
            if inflate:
                self.tally["inflated_pages"] += len(pfns)
                for start, count in _runs(pfns):
                    self.tally["inflate_freed_bytes"] += self.memory.discard(start << PAGE_SHIFT,
                                                                                 count << PAGE_SHIFT)
            else:
                self.tally["deflated_pages"] += len(pfns)
            queue.push(chain, 0)
        self.signal_used(queue_index)

    def _reported(self, queue_index: int) -> None:
        queue = self.queues[queue_index]
        while (chain := queue.pop()) is not None:
            for address, length in chain.readable + chain.writable:
                self.tally["reported_bytes"] += self.memory.discard(address, length)
            self.tally["reports"] += 1
            queue.push(chain, 0)
        self.signal_used(queue_index)

    def _take_stats(self) -> None:
        """Read what the driver put on statsq; keep its (last) buffer until we want fresh stats."""
        index = self._stats_index()
        if index is None:
            return
        queue = self.queues[index]
        while (chain := queue.pop()) is not None:
            data = bytearray()
            for address, length in chain.readable:
                data += self.memory.read(address, max(0, min(length, 4096 - len(data))))
            stats = dict(self.guest_stats)
            for offset in range(0, len(data) - _STAT.size + 1, _STAT.size):
                tag, value = _STAT.unpack_from(data, offset)
                if tag in STAT_NAMES:
                    stats[STAT_NAMES[tag]] = value
            self.guest_stats = stats
            self.stats_updated_ns = time.time_ns()
            self.tally["stats_updates"] += 1
            if self._stats_chain is not None:  # a driver never parks two, but be safe: return the older
                queue.push(self._stats_chain, 0)
            self._stats_chain = chain
        self.signal_used(index)

    def _stats_index(self) -> int | None:
        return 2 if self.has_feature(F_STATS_VQ) and self.queue_usable(2) else None

    def poll_stats(self) -> None:
        """Timer: hand the parked stats buffer back, so the driver refills it (I/O thread)."""
        with self.host_work():
            index = self._stats_index()
            if index is None:
                return
            if self._stats_chain is None:
                self._take_stats()  # after a restore the parked buffer is handed out again here
            if self._stats_chain is not None:
                self.queues[index].push(self._stats_chain, 0)
                self._stats_chain = None
                self.signal_used(index)
            self._arm()

    def _arm(self) -> None:
        interval = self.stats_interval_s
        self._timer(time.time_ns() + interval * 1_000_000_000 if interval > 0 and self.active else None)

    # --- the host's controls -----------------------------------------------------------------------

    def set_target_pages(self, pages: int) -> None:
        """Ask the driver for a balloon of `pages` 4 KiB pages (a config-change interrupt)."""
        if pages < 0 or pages > (self.memory.size >> PAGE_SHIFT):
            raise ValueError(f"balloon target {pages} pages is outside 0..{self.memory.size >> PAGE_SHIFT}")
        with self.lock:
            self.target_pages = pages
            active = self.active
        if active:
            self.config_changed()

    def set_stats_interval(self, seconds: int) -> None:
        with self.lock:
            self.stats_interval_s = seconds
            self._arm()

    def statistics(self) -> dict[str, int]:
        """Firecracker's GET /balloon/statistics: target and actual, then what the guest reported."""
        with self.lock:
            return {"target_pages": self.target_pages, "actual_pages": self.actual_pages,
                    "target_mib": self.target_pages >> (20 - PAGE_SHIFT),
                    "actual_mib": self.actual_pages >> (20 - PAGE_SHIFT), **self.guest_stats}

    def stats(self) -> dict[str, int]:
        """For pyvmm's stats: the balloon's counters."""
        with self.lock:
            return {"target_pages": self.target_pages, "actual_pages": self.actual_pages, **self.tally}

    # --- configuration space and lifecycle ------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.target_pages, self.actual_pages, 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == 4 and len(data) == 4:  # only `actual` is the driver's to write
            with self.lock:
                self.actual_pages = int.from_bytes(data, "little")

    def on_activate(self) -> None:
        self._arm()

    def on_reset(self) -> None:
        self._stats_chain = None
        self.actual_pages = 0
        self._timer(None)

    # --- snapshot -------------------------------------------------------------------------------------

    def save(self) -> BalloonState:
        with self.lock:
            return BalloonState(virtio=self.save_virtio(), target_pages=self.target_pages,
                                actual_pages=self.actual_pages, stats_interval_s=self.stats_interval_s,
                                guest_stats=dict(self.guest_stats), counters=dict(self.tally))

    def check_restorable(self, state: State) -> None:
        state = require(state, BalloonState)
        self.check_virtio(state.virtio)

    def restore(self, state: BalloonState) -> None:  # type: ignore[override]
        self.check_restorable(state)
        with self.lock:
            self.restore_virtio(state.virtio)
            self.target_pages, self.actual_pages = state.target_pages, state.actual_pages
            self.stats_interval_s = state.stats_interval_s
            self.guest_stats = dict(state.guest_stats)
            self.tally = {**self.tally, **state.counters}
            self._stats_chain = None  # in flight at the save: the queue hands it out again
            self._arm()


def _runs(pfns) -> list[tuple[int, int]]:
    """Consecutive page frame numbers as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs


@dataclass(frozen=True)
class BalloonState(State):
    KIND = "virtio_balloon"
    virtio: VirtioDeviceState
    target_pages: int
    actual_pages: int
    stats_interval_s: int
    guest_stats: dict[str, int]
    counters: dict[str, int]

    def validate(self) -> None:
        self.check_range("target_pages", 0, 0xFFFF_FFFF)
        self.check_range("actual_pages", 0, 0xFFFF_FFFF)
        self.check_range("stats_interval_s", 0, 0xFFFF)
        for name in self.guest_stats:
            if name not in STAT_NAMES.values():
                self.fail("guest_stats", f"{name!r} is not a balloon statistic")
