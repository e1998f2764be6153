"""Split virtqueues (virtio 1.2, section 2.7): the device side, hardened against the guest.

Everything the ring holds is written by the guest driver and trusted for nothing. Two
kinds of damage are told apart:

- the ring itself is broken (the available index jumped by more than the queue size, a
  head index is out of range or offered again while the device holds it, the ring areas
  left guest RAM): the device cannot tell
  which buffers are real any more, so the queue raises `VirtqueueBroken` and the device
  is marked DEVICE_NEEDS_RESET (spec 2.1.2);
- one chain is malformed (a loop, a next index out of range, a buffer outside guest RAM,
  a nested or misused indirect table, a readable buffer after a writable one, more bytes
  than a request may carry): that request alone fails. Its head is returned to the driver
  with zero bytes written and the queue moves on.

Every byte the device reads or writes goes through `GuestMemory.view`, which refuses
anything outside guest RAM, so no guest value can make pyvmm touch other memory.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from typing import Final

from ...errors import PyvmmError
from ...memory import GuestMemory
from ...memory.guest_memory import GuestMemoryError
from .queue_state import MAX_QUEUE_SIZE, SplitQueueState

log = logging.getLogger(__name__)

VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

DESC_SIZE: Final = 16
MAX_CHAIN_BYTES: Final = 1 << 32  # a chain's total length must fit the used ring's 32-bit length

_DESC: Final = struct.Struct("<QIHH")


class VirtqueueBroken(PyvmmError):
    """The ring cannot be trusted any more: the device needs a reset."""


class ChainError(PyvmmError):
    """One descriptor chain is malformed: fail that request only."""


_NOT_HELD: Final = object()


class DescriptorChain:
    """One request: the device-readable buffers, then the device-writable ones, as (address, length),
    with their total lengths (kept by whoever appends: only the queue's walk builds chains)."""

    __slots__ = ("head", "readable", "writable", "readable_length", "writable_length")

    def __init__(self, head: int) -> None:
        self.head = head
        self.readable: list[tuple[int, int]] = []
        self.writable: list[tuple[int, int]] = []
        self.readable_length = 0
        self.writable_length = 0

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"


def buffer_views(memory: GuestMemory, buffers: list[tuple[int, int]], offset: int = 0,
                 length: int | None = None) -> list[memoryview]:
    """Zero-copy views of bytes [offset, offset+length) of a buffer list (for preadv/pwritev)."""
    views: list[memoryview] = []
    remaining = None if length is None else length
    for address, size in buffers:
        if offset >= size:
            offset -= size
            continue
        take = size - offset
        if remaining is not None:
            take = min(take, remaining)
        if take > 0:
            views.append(memory.view(address + offset, take))
        offset = 0
        if remaining is not None:
            remaining -= take
            if remaining <= 0:
                break
    return views


def read_buffers(memory: GuestMemory, buffers: list[tuple[int, int]], offset: int = 0,
                 length: int | None = None) -> bytes:
    return b"".join(bytes(v) for v in buffer_views(memory, buffers, offset, length))


def write_buffers(memory: GuestMemory, buffers: list[tuple[int, int]], data: bytes | memoryview,
                  offset: int = 0) -> int:
    """Scatter `data` into the buffers from `offset`; returns how many bytes fitted."""
    done = 0
    for view in buffer_views(memory, buffers, offset, len(data)):
        view[:] = data[done:done + len(view)]
        done += len(view)
    return done


class SplitQueue:
    """The device's view of one split virtqueue.

    The transport fills in the size and the three ring addresses while the driver sets the
    queue up, then marks it ready. `pop()` takes the next available chain, `push()` returns
    a finished one, `needs_interrupt()` says whether the driver wants to hear about it.

    Requests in flight (popped, not yet pushed: a receive buffer a device holds for the next
    packet) are recorded by head. A saved state lists them and the restored queue hands them
    out again, first and in the order they were popped: a request in flight at a save is
    re-done after the restore, from the descriptors the guest left in place (the driver does
    not touch a chain it has not got back).
    """

    memory: GuestMemory  # from activate() (or the device's, at a restore): rings are read after it

    def __init__(self, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"virtqueue size {max_size} must be a power of two up to {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.event_idx = False
        self.indirect = False
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.last_avail = 0       # next available-ring slot the device will read
        self.used_idx = 0         # next used-ring slot the device will write
        self.signalled_used = 0   # used_idx when the driver was last interrupted
        self.malformed_chains = 0
        self.stray_completions = 0                # push() of a chain the device does not hold
        self.completed = 0
        self._in_flight: dict[int, None] = {}   # heads popped and not pushed, in pop order
        self._redo: deque[int] = deque()        # in flight at a save: handed out again first
        self._last_from_redo = False            # where the last pop() took its chain (for undo_pop)
        self.kicks_suppressed = False           # between suppress_kicks() and allow_kicks()
        self.kicks_held = False                 # allow_kicks() leaves them suppressed (hold_kicks)

    # --- setup (transport) ---------------------------------------------------------------------

    def activate(self, memory: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """Check the ring the driver described and start using it; raises VirtqueueBroken."""
        if self.size == 0 or self.size > self.max_size or self.size & (self.size - 1):
            raise VirtqueueBroken(f"queue size {self.size} is not a power of two up to {self.max_size}")
        for name, address, length, align in (
            ("descriptor table", self.desc_table, DESC_SIZE * self.size, 16),
            ("available ring", self.avail_ring, 6 + 2 * self.size, 2),
            ("used ring", self.used_ring, 6 + 8 * self.size, 4),
        ):
            if address % align:
                raise VirtqueueBroken(f"{name} at {address:#x} is not {align}-byte aligned")
            if not memory.contains(address, length):
                raise VirtqueueBroken(f"{name} at {address:#x}+{length:#x} is outside guest RAM")
        self.memory, self.event_idx, self.indirect = memory, event_idx, indirect
        self.signalled_used = self.used_idx

    # --- device side -------------------------------------------------------------------------

    def _avail_idx(self) -> int:
        return self.memory.read_u16(self.avail_ring + 2)

    def notify_on_next_add(self) -> None:
        """Ask the driver to notify the device when it next adds a buffer, however many it
        added before: with EVENT_IDX a driver only kicks past the avail_event the device
        wrote, which pop() moves only when it has taken every entry it saw (entries left
        unread lie past it)."""
        if self.event_idx:
            self.memory.write_u16(self.used_ring + 4 + 8 * self.size, self._avail_idx())

    def suppress_kicks(self) -> None:
        """While the device is taking requests anyway, the driver need not kick for the ones it
        adds meanwhile (a kick is an exit and a wake-up): with EVENT_IDX pop() leaves avail_event
        where the driver has passed it, else the used ring's NO_NOTIFY flag is set (a hint)."""
        self.kicks_suppressed = True
        if not self.event_idx:
            self.memory.write_u16(self.used_ring, VIRTQ_USED_F_NO_NOTIFY)

    def allow_kicks(self) -> None:
        """Ask for a kick at the next entry again. Entries the driver added meanwhile came
        without one: the caller checks has_available() after this and serves them. Not while
        kicks are held: whoever holds them serves the queue when it lets them go."""
        if self.kicks_held:
            return
        self.kicks_suppressed = False
        if self.event_idx:
            self.notify_on_next_add()
        else:
            self.memory.write_u16(self.used_ring, 0)

    def hold_kicks(self, held: bool) -> None:
        """Held: once suppressed (the device is taking requests), kicks stay suppressed until
        released; the holder serves the queue then (inline_kicks.py: at the slice's end)."""
        self.kicks_held = held

    @property
    def redoing(self) -> bool:
        """Requests in flight at a save are still to be handed out again."""
        return bool(self._redo)

    def has_available(self) -> bool:
        return bool(self._redo) or self._pending() > 0

    def _pending(self) -> int:
        """Entries the driver made available that the device has not taken."""
        pending = (self._avail_idx() - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueBroken(f"available index moved {pending} entries ahead on a queue of {self.size}")
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available request, or None. Malformed chains are completed (0 bytes) and skipped."""
        memory = self.memory
        while self._redo:
            chain = self._take(self._redo.popleft())
            if chain is not None:
                self._last_from_redo = True
                return chain
        self._last_from_redo = False
        while (pending := self._pending()) > 0:
            slot = self.last_avail % self.size
            head = memory.read_u16(self.avail_ring + 4 + 2 * slot)
            if head >= self.size:  # before taking the entry: a broken queue's state still adds up (a save)
                raise VirtqueueBroken(f"available ring slot {slot} names descriptor {head} of {self.size}")
            if head in self._in_flight:  # the driver may not offer a chain the device has not returned
                raise VirtqueueBroken(f"available ring slot {slot} offers descriptor {head} again while the "
                                      "device holds it")
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            # With EVENT_IDX, ask to be notified for the next entry added, once the device has
            # taken all it saw: before that the driver's additions come after entries the
            # device has yet to take, so they would bring no kick either way.
            if pending == 1 and self.event_idx and not self.kicks_suppressed:
                memory.write_u16(self.used_ring + 4 + 8 * self.size, self.last_avail)
            chain = self._take(head)
            if chain is not None:
                return chain
        return None

    def undo_pop(self, chain: DescriptorChain) -> None:
        """Put back the chain the last pop() returned, untouched: the next pop() returns it again
        (a device that may not serve it yet, e.g. rate-limited, leaves it to the driver's ring)."""
        self._in_flight.pop(chain.head, None)
        if self._last_from_redo:
            self._redo.appendleft(chain.head)
        else:
            self.last_avail = (self.last_avail - 1) & 0xFFFF

    def _take(self, head: int) -> DescriptorChain | None:
        """The request at `head`, now in flight; None where it was malformed (completed, 0 bytes)."""
        try:
            chain = self._walk(head)
        except (ChainError, GuestMemoryError) as exc:
            self._drop_malformed(head, exc)
            return None
        self._in_flight[head] = None
        return chain

    def _drop_malformed(self, head: int, exc: Exception) -> None:
        self.malformed_chains += 1
        if self.malformed_chains == 1 or log.isEnabledFor(logging.DEBUG):
            log.warning("virtqueue: dropped a malformed request (head %d): %s", head, str(exc))
        self._in_flight[head] = None
        self.push(DescriptorChain(head), 0)

    def _walk(self, head: int) -> DescriptorChain:
        memory = self.memory
        chain = DescriptorChain(head)
        readable, writable = chain.readable, chain.writable
        table_size, index = self.size, head
        # The table's region and offset (checked inside guest RAM at activation): no view per chain.
        table, table_start = memory.locate(self.desc_table, DESC_SIZE * table_size)
        unpack_from, contains = _DESC.unpack_from, memory.contains
        in_indirect = False
        seen = 0
        total = 0
        while True:
            seen += 1
            if seen > table_size:
                raise ChainError(f"chain longer than its table ({table_size} descriptors): a loop")
            address, length, flags, next_index = unpack_from(table, table_start + DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise ChainError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError("indirect descriptor with the NEXT flag")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise ChainError(f"indirect table length {length} is not a multiple of {DESC_SIZE}")
                if not contains(address, length):
                    raise ChainError(f"indirect table {address:#x}+{length:#x} is outside guest RAM")
                if readable or writable:
                    raise ChainError("indirect descriptor after direct buffers in the same chain")
                (table, table_start), table_size = memory.locate(address, length), length // DESC_SIZE
                index, in_indirect, seen = 0, True, 0
                continue
            if length:
                if not contains(address, length):
                    raise ChainError(f"buffer {address:#x}+{length:#x} is outside guest RAM")
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise ChainError("chain carries more than 4 GiB")
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append((address, length))
                    chain.writable_length += length
                elif writable:
                    raise ChainError("device-readable buffer after a device-writable one")
                else:
                    readable.append((address, length))
                    chain.readable_length += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if next_index >= table_size:
                raise ChainError(f"next descriptor {next_index} is outside a table of {table_size}")
            index = next_index

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return a request to the driver with `written` bytes stored in its writable buffers.
        One the device does not hold (returned already, or taken before a reset) is a device
        bug: it is logged and not returned, since the driver would find its ring corrupt."""
        writes: list[list[int]] = []
        if self._place_used(chain, written, writes):
            self._note_writes(writes)
            self._publish_used()

    def push_many(self, completions: list[tuple[DescriptorChain, int]]) -> None:
        """push() each (chain, written), in order, with one used-index store for all of them
        (a merged receive buffer's pieces: the driver sees them together, as num_buffers says)."""
        placed = False
        writes: list[list[int]] = []
        for chain, written in completions:
            placed = self._place_used(chain, written, writes) or placed
        if placed:
            self._note_writes(writes)
            self._publish_used()

    def _note_writes(self, writes: list[list[int]]) -> None:
        """Tell guest memory's watcher (the software CPU's code invalidation, dirty logging) what
        the device wrote: once per run of adjacent buffers (a received frame's pieces often are)."""
        note = self.memory.on_device_writes
        if note is not None:
            note([(start, end - start) for start, end in writes])

    def _place_used(self, chain: DescriptorChain, written: int, writes: list[list[int]]) -> bool:
        """Write the used element for `chain` at the used index, which moves on (not yet published);
        the buffers it wrote join `writes` ([start, end) runs)."""
        if self._in_flight.pop(chain.head, _NOT_HELD) is _NOT_HELD:
            self.stray_completions += 1
            if self.stray_completions == 1 or log.isEnabledFor(logging.DEBUG):
                log.error("virtqueue: the device returned descriptor %d, which it does not hold (a device bug): "
                          "kept from the driver (used index %d)", chain.head, self.used_idx)
            return False
        written = min(written, chain.writable_length)
        memory = self.memory
        remaining = written
        for address, length in chain.writable:
            if remaining <= 0:
                break
            end = address + min(length, remaining)
            if writes and writes[-1][1] == address:
                writes[-1][1] = end
            else:
                writes.append([address, end])
            remaining -= length
        element = self.used_ring + 4 + 8 * (self.used_idx % self.size)
        memory.write_u32(element, chain.head)  # (one store each, never zeroed first: GuestMemory._store)
        memory.write_u32(element + 4, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.completed += 1
        return True

    def _publish_used(self) -> None:
        # after the elements: x86 keeps store order, so the driver never sees the index first
        self.memory.write_u16(self.used_ring + 2, self.used_idx)

    def needs_interrupt(self) -> bool:
        """After one or more push(): should the driver be interrupted (event index or NO_INTERRUPT)?"""
        old, new = self.signalled_used, self.used_idx
        if old == new:
            return False
        if self.event_idx:
            used_event = self.memory.read_u16(self.avail_ring + 4 + 2 * self.size)
            notify = (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        else:
            notify = not self.memory.read_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
        self.signalled_used = new
        return notify

    # --- lent to another server (virtio-net's receive thread, net_rx_thread.py) -------------------

    def lend(self, held: list[int]) -> tuple[int, int]:
        """Another server takes the queue over from (last_avail, used_idx), returned, with the
        requests `held` (heads), which must be all this queue has in flight; nothing here touches
        the rings until take_back()."""
        if self._redo or set(self._in_flight) != set(held):
            raise ValueError("virtqueue: lent with requests in flight that the borrower does not hold")
        return self.last_avail, self.used_idx

    def note_used(self, used_idx: int, completed: int) -> None:
        """While lent: the borrower published up to `used_idx`, `completed` more requests."""
        self.used_idx = used_idx
        self.completed += completed

    def take_back(self, last_avail: int, used_idx: int, held: list[int]) -> None:
        """The borrower stopped at (last_avail, used_idx) holding the requests `held` (heads, in
        the order it took them): they are this queue's in flight now."""
        self.last_avail, self.used_idx = last_avail & 0xFFFF, used_idx & 0xFFFF
        self._in_flight = dict.fromkeys(held)

    # --- snapshot ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Heads of the requests popped and not yet pushed, oldest first."""
        return (*self._redo, *self._in_flight)

    def save(self) -> SplitQueueState:
        return SplitQueueState(
            size=self.size, ready=self.ready, desc_table=self.desc_table, avail_ring=self.avail_ring,
            used_ring=self.used_ring, last_avail=self.last_avail, used_idx=self.used_idx,
            signalled_used=self.signalled_used, event_idx=self.event_idx, indirect=self.indirect,
            malformed_chains=self.malformed_chains, completed=self.completed, in_flight=self.in_flight)

    def check_restorable(self, state: SplitQueueState, where: str = "virtqueue", *, in_use: bool = False) -> None:
        """Raise StateError unless `state` fits this queue. A driver may program any size; one the
        device serves (`in_use`: ready on an active device) was checked at activation."""
        if in_use and state.ready and (state.size > self.max_size or state.size & (state.size - 1) or not state.size):
            state.fail("size", f"{where}: {state.size} entries in use, the device serves powers of two "
                               f"up to {self.max_size}")

    def restore(self, state: SplitQueueState) -> None:
        """Load a state (check_restorable first). The guest memory is set by the device's activate
        or restore: a ready queue of an active device has it."""
        self.check_restorable(state)
        for name in ("size", "ready", "desc_table", "avail_ring", "used_ring", "last_avail", "used_idx",
                     "signalled_used", "event_idx", "indirect", "malformed_chains", "completed"):
            setattr(self, name, getattr(state, name))
        self._in_flight = {}
        self._redo = deque(state.in_flight)
