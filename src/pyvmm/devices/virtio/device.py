"""VirtioDevice: what every virtio device shares, independent of its transport.

A transport (virtio-mmio, virtio-pci) owns the registers the driver programs; it calls
the device through a small surface:

    offered_features / set_driver_features() / features_ok()   feature negotiation
    read_config() / write_config()                              device-specific config space
    queues[i]                                                   size and ring addresses
    activate() at DRIVER_OK, reset() when the driver writes 0 to status
    notify(i)                                                   the driver kicked queue i

and gives the device a `VirtioInterrupt` to signal used buffers and config changes.
A device subclass implements `process_queue(i)` and, if it has one, its config layout;
it never learns whether it sits on PCI or MMIO, nor which CPU backend runs the guest.

Threads: notify() may come from a vCPU thread (software CPU: from the MMIO handler) or
from an I/O thread (KVM: an ioeventfd), and device back-ends (TAP, sockets) complete
work from I/O threads. One re-entrant lock per device serialises all of it. A device
whose queue work is short host I/O (`quick_queues`) may be served on the thread that kicked
it, never waiting there for another, its interrupts held until the guest's slice ends
(serve_in_place, finish_in_place; inline_kicks.py decides).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from ...memory.guest_memory import GuestMemory, GuestMemoryError
from ...persist import State, require
from .queue import SplitQueue, VirtqueueBroken
from .queue_state import SplitQueueState

log = logging.getLogger(__name__)

# Device IDs (virtio 1.2, section 5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19

# Reserved feature bits (section 6)
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
COMMON_FEATURES = VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | VIRTIO_F_VERSION_1

# Device status bits (section 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80


class VirtioInterrupt(Protocol):
    """Given to the device by its transport."""

    def signal_used(self, queue_index: int) -> None:
        """The device put buffers on queue `queue_index`'s used ring."""

    def signal_config(self) -> None:
        """The device configuration changed (or the device needs a reset)."""

    def set_needs_reset(self) -> None:
        """Set DEVICE_NEEDS_RESET in the status the driver reads, then signal a config change."""


class _NoInterrupt:
    def signal_used(self, queue_index: int) -> None:
        pass

    def signal_config(self) -> None:
        pass

    def set_needs_reset(self) -> None:
        pass


class VirtioDevice:
    device_id = 0
    name = "virtio"
    # Whether serving a queue is only short host I/O that never waits on a peer or the guest
    # (a disk image's page cache): then a kick may be served on the vCPU thread that made it.
    quick_queues = False
    # Whether a driver that kicked typically waits for those requests' completion (a disk read,
    # not a frame sent, whose buffer comes back whenever): inline_kicks.py may then end the
    # guest's slice after a kick served in place, to interrupt it at once.
    completions_awaited = False
    # Guest RAM, from attach() (the transport, before a driver can set the device up): every
    # queue and buffer operation comes after it.
    memory: GuestMemory

    def __init__(self, queue_sizes: tuple[int, ...], features: int = 0) -> None:
        self.queues = [SplitQueue(size) for size in queue_sizes]
        self.offered_features = COMMON_FEATURES | features
        self.acked_features = 0
        self.interrupt: VirtioInterrupt = _NoInterrupt()
        self.lock = threading.RLock()
        self.active = False
        self.broken: str | None = None  # why the device needs a reset, once it does
        # Requests and malformed chains of queues since reset (their own counts restart there),
        # and how often the guest broke a ring: counters for stats, not guest state.
        self._earlier = {"requests": 0, "malformed_chains": 0}
        self._serving_in_place = False  # in serve_in_place: no interrupt now
        self._held_queues: set[int] = set()  # served in place, until finish_in_place
        self.failures = 0

    # --- wiring (builder / transport) -------------------------------------------------------------

    def attach(self, memory: GuestMemory, interrupt: VirtioInterrupt) -> None:
        self.memory, self.interrupt = memory, interrupt

    # --- feature negotiation ---------------------------------------------------------------------

    def set_driver_features(self, features: int) -> None:
        self.acked_features = features & self.offered_features

    def has_feature(self, feature: int) -> bool:
        return bool(self.acked_features & feature)

    def features_ok(self) -> bool:
        """Can the device work with what the driver acknowledged? Modern transports need VERSION_1."""
        return self.has_feature(VIRTIO_F_VERSION_1)

    # --- configuration space ------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        """The device-specific configuration structure as the driver reads it."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        data = self.config_bytes()[offset:offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        log.debug("%s: ignored config write at %#x", self.name, offset)

    # --- lifecycle -----------------------------------------------------------------------------------

    def activate(self) -> None:
        """DRIVER_OK: check the rings of the queues the driver enabled and start serving them.
        A device that needs a reset stays stopped until the driver resets it (spec 2.1.2)."""
        with self.lock:
            if self.broken:
                return
            event_idx, indirect = self.has_feature(VIRTIO_F_EVENT_IDX), self.has_feature(VIRTIO_F_INDIRECT_DESC)
            try:
                for queue in self.queues:
                    if queue.ready:
                        queue.activate(self.memory, event_idx=event_idx, indirect=indirect)
            except VirtqueueBroken as exc:
                self.fail(str(exc))
                return
            self.active = True
            self.on_activate()
        for index, queue in enumerate(self.queues):  # buffers made available before DRIVER_OK
            if queue.ready:
                self.notify(index)

    def reset(self) -> None:
        with self.lock:
            for queue in self.queues:
                self._earlier["requests"] += queue.completed
                self._earlier["malformed_chains"] += queue.malformed_chains
            self.on_reset()
            self.active = False
            self.broken = None
            self.acked_features = 0
            for queue in self.queues:
                queue.reset()

    def notify(self, queue_index: int) -> None:
        """The driver made buffers available on queue `queue_index` (a kick)."""
        with self.lock:
            if not self.active or self.broken or not 0 <= queue_index < len(self.queues):
                return
            if not self.queues[queue_index].ready:
                return
            try:
                self.process_queue(queue_index)
            except (VirtqueueBroken, GuestMemoryError) as exc:
                self.fail(str(exc))

    def serve_in_place(self, queue_index: int) -> bool:
        """A kick served on the thread that made it, for as long as that thread runs the guest:
        serve the queue now if no other thread is (else False, nothing done), then hold its
        kicks and used-buffer interrupts back until finish_in_place(), which serves what came
        meanwhile and interrupts the driver once for all of it (a kick and an interrupt per
        request would otherwise be an exit each, where the I/O thread took many at a time)."""
        if not 0 <= queue_index < len(self.queues) or not self.lock.acquire(blocking=False):
            return False
        try:
            self._serving_in_place = True
            self.queues[queue_index].hold_kicks(True)
            self._held_queues.add(queue_index)
            self.notify(queue_index)
        finally:
            self._serving_in_place = False
            self.lock.release()
        return True

    def finish_in_place(self) -> bool:
        """The guest stopped running on that thread: serve the queues served in place again
        (requests added without a kick), ask for kicks again, send the interrupts held.
        Whether the driver added requests meanwhile (to a queue that could take them)."""
        came = False
        with self.lock:
            held, self._held_queues = self._held_queues, set()
            for queue_index in sorted(held):
                self.queues[queue_index].hold_kicks(False)
                if not self._nothing_came(queue_index):
                    came = came or self.queue_usable(queue_index)
                    self.notify(queue_index)       # asks for kicks again as it ends
                if self.queue_usable(queue_index):
                    self.signal_used(queue_index)  # (a throttled queue serves nothing now)
        return came

    def _nothing_came(self, queue_index: int) -> bool:
        """A queue served with its kicks suppressed, to which the driver added nothing since:
        ask for kicks again, and look once more (an entry added in between came without one).
        True when nothing is to be served, which spares a notify() its whole empty pass (a
        batch that pops nothing, at every request at iodepth 1)."""
        queue = self.queues[queue_index]
        if not (self.queue_usable(queue_index) and queue.kicks_suppressed):
            return False
        try:
            if queue.has_available():
                return False
            queue.allow_kicks()
            return not queue.has_available()
        except (VirtqueueBroken, GuestMemoryError) as exc:
            self.fail(str(exc))
            return True

    def serve_without_kicks(self, queue_index: int, serve: Callable[[], bool], blocked: Callable[[], bool]) -> None:
        """Serve a queue with the driver's kicks suppressed while it runs (lock held): serve()
        takes a batch and says whether it took all there was; the used buffers are signalled
        after each. Once a batch took all, kicks are asked for again and what the driver added
        meanwhile, without a kick, is served before returning. Kicks held by serve_in_place stay
        suppressed until finish_in_place. `blocked`: a rate limit that stops serving for now."""
        queue = self.queues[queue_index]
        queue.suppress_kicks()
        try:
            while not blocked():
                drained = serve()
                self.signal_used(queue_index)
                if drained:
                    queue.allow_kicks()
                    if blocked() or not queue.has_available():
                        return
                    queue.suppress_kicks()
        finally:
            if queue.kicks_suppressed:  # throttled, or the ring broke
                queue.allow_kicks()

    @contextlib.contextmanager
    def host_work(self):
        """Work the host starts (sockets, terminal input, restore) that touches the rings: a ring
        the guest broke marks the device for reset, as a kick would, instead of ending the I/O thread."""
        with self.lock:
            try:
                yield
            except (VirtqueueBroken, GuestMemoryError) as exc:
                self.fail(str(exc))

    def queue_usable(self, queue_index: int) -> bool:
        return self.active and not self.broken and self.queues[queue_index].ready

    def fail(self, reason: str) -> None:
        """The guest broke the protocol beyond one request: stop serving until the driver resets us."""
        with self.lock:
            if self.broken:
                return
            self.broken = reason
            self.failures += 1
            self.active = False
        log.warning("%s: %s; the device needs a reset", self.name, reason)
        self.interrupt.set_needs_reset()

    def queue_counters(self) -> dict[str, int | bool]:
        """Transport-independent counters over the device's life: requests completed, malformed
        descriptor chains dropped, rings the guest broke (needing a reset), and whether it is
        broken now. Device models add their own (bytes, errors) in stats()."""
        with self.lock:
            return {"requests": self._earlier["requests"] + sum(q.completed for q in self.queues),
                    "malformed_chains": self._earlier["malformed_chains"] +
                    sum(q.malformed_chains for q in self.queues),
                    "ring_failures": self.failures, "needs_reset": self.broken is not None}

    # --- for subclasses ---------------------------------------------------------------------------------

    def process_queue(self, queue_index: int) -> None:
        """Serve every available request on the queue (called with the lock held)."""

    def on_activate(self) -> None:
        """The driver is ready: start back-end work (RX polling, ...)."""

    def on_reset(self) -> None:
        """Stop back-end work and forget in-flight requests."""

    def signal_used(self, queue_index: int) -> None:
        """Interrupt the driver for queue `queue_index` if the ring asks for it."""
        if not self._serving_in_place and self.queues[queue_index].needs_interrupt():
            self.interrupt.signal_used(queue_index)

    def config_changed(self) -> None:
        self.interrupt.signal_config()

    # --- snapshot ----------------------------------------------------------------------------------------
    # A device with state of its own wraps VirtioDeviceState in its state class and overrides
    # save, check_restorable (everything a restore could refuse, changing nothing) and restore
    # (check_restorable, then apply), using save_virtio, check_virtio and restore_virtio.

    def save(self) -> State:
        return self.save_virtio()

    def check_restorable(self, state: State) -> None:
        self.check_virtio(require(state, VirtioDeviceState))

    def restore(self, state: State) -> None:
        self.check_restorable(state)
        assert isinstance(state, VirtioDeviceState)
        self.restore_virtio(state)

    def save_virtio(self) -> VirtioDeviceState:
        with self.lock:
            return VirtioDeviceState(device_id=self.device_id, acked_features=self.acked_features,
                                     active=self.active, broken=self.broken,
                                     queues=tuple(queue.save() for queue in self.queues))

    def check_virtio(self, state: VirtioDeviceState) -> None:
        """Raise StateError unless `state` fits this device (kind, queues, features offered)."""
        if state.device_id != self.device_id:
            state.fail("device_id", f"{state.device_id} is not this {self.name}'s {self.device_id}")
        if len(state.queues) != len(self.queues):
            state.fail("queues", f"{len(state.queues)} queues, this {self.name} has {len(self.queues)}")
        if state.acked_features & ~self.offered_features:
            state.fail("acked_features", f"{state.acked_features & ~self.offered_features:#x} are not offered "
                                         f"by this {self.name}")
        for index, (queue, queue_state) in enumerate(zip(self.queues, state.queues)):
            queue.check_restorable(queue_state, f"queue {index}", in_use=state.active)

    def restore_virtio(self, state: VirtioDeviceState) -> None:
        """Apply a state check_virtio accepted. Requests in flight at the save are handed out
        again by the queues' next pops, never done during the restore: the restored VM kicks
        every queue once when it resumes (restore.serve_lost_kicks)."""
        with self.lock:
            self.acked_features = state.acked_features
            self.broken = state.broken
            for queue, queue_state in zip(self.queues, state.queues):
                queue.restore(queue_state)
                if queue.ready:
                    queue.memory = self.memory
            self.active = state.active


@dataclass(frozen=True)
class VirtioDeviceState(State):
    """What every virtio device has: the features the driver took, whether it runs (or why it
    needs a reset) and its queues."""
    KIND = "virtio_device"
    device_id: int
    acked_features: int
    active: bool
    broken: str | None
    queues: tuple[SplitQueueState, ...]

    def validate(self) -> None:
        self.check_range("device_id", 0, 0xFFFF)
        self.check_range("acked_features", 0, (1 << 64) - 1)
        if self.active and self.broken is not None:
            self.fail("active", "a broken device is not active")
