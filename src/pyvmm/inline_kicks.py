"""Serve a kick on the vCPU thread that made it, when that is quicker than handing it on.

On the software CPU a 4 KiB request at queue depth 1 went: the kick handed to the I/O thread,
the guest on into its idle loop and HLT, the slice ending, the scheduler asleep until the I/O
thread's completion woke it: two thread hand-offs and wake-ups around work (a read from the
host's page cache) of tens of microseconds. A device whose queue work is that short
(`quick_queues`: virtio-blk; virtio-net, whose frames to send go to a back-end that never
waits, or whose transmit thread a kick only wakes, and whose receiving stays off the vCPU
thread) has its kick served where it was made
(serve_in_place) when

- the accelerator can run it inside the running guest code (`serve_device_work`: the
  software CPU, in a slice);
- no other thread is serving the device (its lock is free: else the I/O thread gets it); and
- the kicks served there are quick: SLOW_STREAK kicks in a row that each took longer than
  SLOW_NS (reads that miss the page cache, writethrough flushes) send the device's kicks to
  the I/O thread for BACKOFF_NS, so a slow disk stalls the guest's CPU for a few requests now
  and then, not each. The time is wall time, which one preemption or another thread's turn
  with the GIL stretches past SLOW_NS now and then: a single slow kick is not a slow disk (one
  sent a test's whole I/O to the I/O thread under CI's load).

Served there, the queue's kicks and interrupts are held until the slice ends
(finish_in_place): requests the guest adds meanwhile come without a kick, and their
completions with one interrupt, as when the I/O thread took a batch (a kick and an interrupt
per request made fio at iodepth 32 3x slower); a guest waiting for its one request ends the
slice at its HLT and gets the interrupt at once. Never from inside the guest's kick: a
completion raised there would be pending again before a busy device's handler ended, ahead
of every interrupt of its priority class (the serial console once stalled for seconds).

A guest that waits for the one request it kicked for (fio at iodepth 1, a program reading a
file block by block) got that interrupt only at its HLT: after its way into the idle loop, the slice's end
and the wake-up, then its way out again. So when a device's completions are awaited
(`completions_awaited`: a disk's, not a NIC's sent frames) and a kick served here was the only
request of its slice, which then ended at the guest's HLT (the driver added nothing without a
kick, and the guest went idle), the device's next kicks that complete requests here end the
slice where the block with the kick ends (end_running_slice): the completion's interrupt comes
at once and the guest reaps it before it would idle. (Not for a request whose data moves on
other threads: a large disk transfer's interrupt comes when it is done.) A guest that adds more
meanwhile (fio at iodepth 32), or does not idle, keeps one interrupt per slice,
as above: every PROBE_EVERY-th kick lets its slice run on to see which the guest is doing now.

Everything else goes to the I/O thread as before (on KVM, kicks are ioeventfds it serves).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

SLOW_NS = 1_000_000       # longer than a page-cache hit by far, short against a guest's timer tick
SLOW_STREAK = 3
BACKOFF_NS = 1_000_000_000
PROBE_EVERY = 16  # kicks that end their slice between two that let it run on


class InlineKicks:
    """The kick handler (the transport's on_notify) of one device."""

    def __init__(self, device, accel, iothread, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.device, self.accel, self.iothread, self.clock = device, accel, iothread, clock
        self.backoff_until = 0  # clock(): kicks go to the I/O thread until then
        self.slow_kicks = 0  # in a row, served in place
        self.ending_slices = False  # the guest waits for each request: kicks end their slice
        self.slices_ended = 0  # by kicks since the last that let its slice run on

    def __call__(self, queue_index: int) -> None:
        if self.device.quick_queues:
            start = self.clock()
            end_slice = self.ending_slices and self.slices_ended < PROBE_EVERY
            completed = self._completed(queue_index) if end_slice else 0  # (only a kick that may end it)
            if start >= self.backoff_until and self.accel.serve_device_work(
                    functools.partial(self.device.serve_in_place, queue_index),
                    self.device.finish_in_place if end_slice else self._finish_and_learn):
                self.slices_ended = self.slices_ended + 1 if end_slice else 0
                if end_slice and self._completed(queue_index) != completed:
                    self.accel.end_running_slice()
                took = self.clock() - start
                self.slow_kicks = self.slow_kicks + 1 if took > SLOW_NS else 0
                if self.slow_kicks >= SLOW_STREAK:
                    self.slow_kicks = 0
                    self.backoff_until = start + took + BACKOFF_NS
                    log.debug("%s: %d kicks in a row took over %.1f ms on the vCPU thread (the last %.1f ms); "
                              "the I/O thread serves the next for %.1f s", self.device.name, SLOW_STREAK,
                              SLOW_NS / 1e6, took / 1e6, BACKOFF_NS / 1e9)
                return
        self.iothread.call_soon(functools.partial(self.device.notify, queue_index))

    def _completed(self, queue_index: int) -> int:
        """Requests the queue has returned so far (-1 for no such queue: nothing is served)."""
        queues = self.device.queues
        return queues[queue_index].completed if 0 <= queue_index < len(queues) else -1

    def _finish_and_learn(self) -> None:
        """The end of a slice a kick let run on: did the guest add nothing meanwhile and idle?"""
        self.ending_slices = not self.device.finish_in_place() and self.accel.slice_ended_at_hlt and \
            self.device.completions_awaited
