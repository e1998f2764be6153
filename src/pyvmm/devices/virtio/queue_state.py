"""A split virtqueue's saved state (a module of its own: the queue is compiled, see pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ...persist import State

MAX_QUEUE_SIZE: Final = 32768  # the largest split queue (virtio 1.2, 2.7)


@dataclass(frozen=True)
class SplitQueueState(State):
    """What the driver programmed, the device's positions in the rings and the requests in flight.

    Popped requests are either pushed or in flight, so last_avail - used_idx (mod 2^16) is the
    number in flight; the restored queue hands those out again first."""
    KIND = "split_queue"
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    last_avail: int
    used_idx: int
    signalled_used: int
    event_idx: bool
    indirect: bool
    malformed_chains: int
    completed: int
    in_flight: tuple[int, ...]

    def validate(self) -> None:
        self.check_range("size", 0, 0xFFFFFFFF)   # what the driver wrote; checked when the queue starts
        for name in ("desc_table", "avail_ring", "used_ring"):
            self.check_range(name, 0, (1 << 64) - 1)
        for name in ("last_avail", "used_idx", "signalled_used"):
            self.check_range(name, 0, 0xFFFF)
        for name in ("malformed_chains", "completed"):
            self.check_range(name, 0, 1 << 64)
        self.check_items("in_flight", 0, max(min(self.size, MAX_QUEUE_SIZE) - 1, 0))
        if len(set(self.in_flight)) != len(self.in_flight):
            self.fail("in_flight", "a head is listed twice")
        outstanding = (self.last_avail - self.used_idx) & 0xFFFF
        if outstanding != len(self.in_flight):
            self.fail("in_flight", f"{len(self.in_flight)} heads, but the device took {outstanding} requests "
                                   "it has not returned")
