"""virtio-net's transmit thread (net_transmitter.c through net_tx_thread.TxThread), without its
thread: a transmit ring built from the input (its size, EVENT_IDX and INDIRECT_DESC, descriptor
chains direct or through indirect tables, writable descriptors, bad heads, loops, buffers out
of RAM, available-index jumps, used_event and the avail flags), a SOCK_SEQPACKET pair for the
back-end (its buffer sometimes full: writes fail with EAGAIN), and what is done in an
input-chosen order: the driver adds chains, the queue is lent (start), kicked and served (pump),
its reports taken, taken back (stop), served by Python (SplitQueue) and lent again from there.
Allowed outcomes: the transmitter refuses bad parameters (ValueError), stops by itself at what
it does not serve (said by take()), and the taken-back queue raises VirtqueueBroken where the
ring is broken (a jump or a bad head at its next entry); a chain that is malformed is Python's
to drop.

Checked against a model of net_transmitter.c's serve() run first on a copy of RAM, which walks
each chain with Python's walker (SplitQueue): it serves exactly the chains that walker finds
valid and device-readable only (no longer than a frame, no more pieces than allowed) and stops
at the others; the back end received exactly those chains' bytes, in order (a frame the socket
refused counted dropped); the used index moves by the chains take() reports, each used element
names the head in the available ring it served; nothing in RAM outside the used ring changes
(and inside it, exactly what the model wrote); the report eventfd is signalled where the driver
wants an interrupt or the thread stopped; stop() returns the model's indices, from which Python's
SplitQueue serves on (take_back, pop, push)."""

from __future__ import annotations

import os
import select
import socket
import struct

from pyvmm.devices.virtio.net_tx_thread import C_MODULE, TxThread
from pyvmm.devices.virtio.queue import ChainError, DescriptorChain, SplitQueue, VirtqueueBroken, read_buffers
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import GuestMemoryError, RegionSpec

from .c_build import load_c_module
from .guest import RAM, fill, memory, program_queue
from .reader import Reader

OPS = 48                                   # operations per input at most
HEADERS = (12, 12, 0, 10, 1, 4097)         # the last one refused
MAX_FRAMES = (65535 + 18, 1514, 60, 1, 1 << 24, 0)
MAX_PIECES = (1023, 1, 2, 4, 1024, 0)
SNDBUFS = (0, 4096, 32768)                 # the device side's SO_SNDBUF (0: the default); doubled by Linux
INTERRUPT_CHECK = 64                       # net_transmitter.c: chains between looks at the interrupt
FILLERS = (b"F" * 16384, b"F" * 1024, b"F")
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

# What take() says where the transmitter stopped by itself (net_transmitter.c)
JUMP = "the available index moved past the ring"
BAD_HEAD = "a bad head in the available ring"
CHAIN_STOPS = frozenset(("a descriptor chain loops", "an indirect descriptor it does not serve",
                         "an indirect table outside guest RAM's regions", "a device-writable descriptor",
                         "a buffer outside guest RAM's regions", "a chain longer than a frame",
                         "a next index outside the table"))
CHAIN = "chain"                            # the model's word for any of those

SERVED, WAIT, STOPPED = range(3)


_AVAILABLE = load_c_module(C_MODULE)
_shadow: GuestMemory | None = None
_scratch = bytearray(1 << 20)              # a frame received (larger than the socket lets through)
_before, _after = bytearray(RAM), bytearray(RAM)   # RAM before and after the transmitter ran


def shadow() -> GuestMemory:
    """The model's copy of guest RAM (one for the process, as guest.memory())."""
    global _shadow
    if _shadow is None:
        _shadow = GuestMemory.from_specs([RegionSpec(0, RAM)])
    return _shadow


class Model:
    """net_transmitter.c's serving, step for step, on the shadow RAM: serve(), step(), the
    kick and interrupt words, the counters take() returns; gather() is Python's walker plus
    the transmitter's limits (readable only, max_pieces, header + max_frame)."""

    def __init__(self, queue: SplitQueue, walker: SplitQueue, header: int, max_frame: int, max_pieces: int) -> None:
        self.size, self.avail, self.used = queue.size, queue.avail_ring, queue.used_ring
        self.event_idx = queue.event_idx
        self.walker = walker
        self.header, self.max_frame, self.max_pieces = header, max_frame, max_pieces
        self.serving = False
        self.last_avail = self.used_idx = self.signalled = 0
        self.kicks_off = False
        self.since_check = 0
        self.stopped: str | None = None
        self.reported = False
        self.eventfd = 0                   # the report eventfd's count since the harness read it
        self.chains = self.frames = self.bytes = self.dropped = 0
        self.done_used_idx = 0

    def start(self, last_avail: int, used_idx: int, signalled: int) -> None:
        self.last_avail, self.used_idx, self.signalled = last_avail, used_idx, signalled
        self.done_used_idx = used_idx
        self.kicks_off = False
        self.since_check = 0
        self.stopped = None
        self.serving = True

    def stop(self, sh: GuestMemory) -> tuple[int, int]:
        self.serving = False
        self._ask_for_kicks(sh)
        return self.last_avail, self.used_idx

    def take(self) -> tuple[int, int, int, int, int, str | None]:
        stopped = None if self.serving else self.stopped
        self.reported = False
        if not self.serving:
            self.stopped = None
        out = (self.chains, self.frames, self.bytes, self.dropped, self.done_used_idx, stopped)
        self.chains = self.frames = self.bytes = self.dropped = 0
        return out

    def pump(self, sh: GuestMemory) -> list[tuple[int, bytes]]:
        """(head, frame) of each chain served, in order."""
        served: list[tuple[int, bytes]] = []
        if not self.serving:
            return served
        self._refuse_kicks(sh)
        while True:
            step = self._step(sh, served)
            if step == SERVED:
                if self.since_check >= INTERRUPT_CHECK and self._interrupt_wanted(sh):
                    self._report()
                assert len(served) <= 4 << 16, "the transmitter serves the ring for ever (its own writes feed it)"
                continue
            if step == WAIT:
                # the interrupt for what was sent first, then a kick asked for (serve() in C: where
                # the used ring's flags overlap the driver's, the order decides the interrupt)
                if self._interrupt_wanted(sh):
                    self._report()
                self._ask_for_kicks(sh)
                if sh.read_u16(self.avail + 2) != self.last_avail:
                    self._refuse_kicks(sh)
                    continue
            break
        if step == STOPPED:
            self.serving = False
            self._report()
        elif self._interrupt_wanted(sh):
            self._report()
        return served

    def _step(self, sh: GuestMemory, served: list[tuple[int, bytes]]) -> int:
        size = self.size
        pending = (sh.read_u16(self.avail + 2) - self.last_avail) & 0xFFFF
        if pending > size:
            self.stopped = JUMP
            return STOPPED
        if pending == 0:
            return WAIT
        head = sh.read_u16(self.avail + 4 + 2 * (self.last_avail % size))
        if head >= size:
            self.stopped = BAD_HEAD
            return STOPPED
        chain = walk(self.walker, head)
        if (chain is None or chain.writable or len(chain.readable) > self.max_pieces
                or chain.readable_length > self.header + self.max_frame):
            self.stopped = CHAIN
            return STOPPED
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        served.append((head, read_buffers(sh, chain.readable)))
        element = self.used + 4 + 8 * (self.used_idx % size)
        sh.write_u32(element, head)
        sh.write_u32(element + 4, 0)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        sh.write_u16(self.used + 2, self.used_idx)
        self.chains += 1
        self.done_used_idx = self.used_idx
        self.since_check += 1
        return SERVED

    def _ask_for_kicks(self, sh: GuestMemory) -> None:
        if self.event_idx:
            sh.write_u16(self.used + 4 + 8 * self.size, self.last_avail)
        elif self.kicks_off:
            sh.write_u16(self.used, 0)
            self.kicks_off = False

    def _refuse_kicks(self, sh: GuestMemory) -> None:
        if not self.event_idx and not self.kicks_off:
            sh.write_u16(self.used, 1)
            self.kicks_off = True

    def _interrupt_wanted(self, sh: GuestMemory) -> bool:
        old, now = self.signalled, self.used_idx
        self.since_check = 0
        if old == now:
            return False
        self.signalled = now
        if self.event_idx:
            used_event = sh.read_u16(self.avail + 4 + 2 * self.size)
            return (now - used_event - 1) & 0xFFFF < (now - old) & 0xFFFF
        return not sh.read_u16(self.avail) & 1

    def _report(self) -> None:
        if not self.reported:
            self.reported = True
            self.eventfd += 1


def walk(walker: SplitQueue, head: int) -> DescriptorChain | None:
    """The chain at `head` as Python's walker reads it; None where it finds it malformed."""
    try:
        return walker._walk(head)
    except (ChainError, GuestMemoryError):
        return None


def one_input(data: bytes) -> None:
    if not _AVAILABLE:
        return  # not built: nothing of it to run
    r = Reader(data)
    mem = memory()
    queue = SplitQueue(256)
    program_queue(queue, r)
    event_idx, indirect = r.flag(), r.flag()
    header, max_frame, max_pieces = r.choice(HEADERS), r.choice(MAX_FRAMES), r.choice(MAX_PIECES)
    backend = r.u8()
    fill(mem, r)
    try:
        queue.activate(mem, event_idx=event_idx, indirect=indirect)
    except VirtqueueBroken:
        return
    sh = shadow()
    walker = SplitQueue(256)
    walker.size, walker.desc_table, walker.avail_ring, walker.used_ring = (queue.size, queue.desc_table,
                                                                           queue.avail_ring, queue.used_ring)
    walker.activate(sh, event_idx=event_idx, indirect=indirect)
    device_side, host_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        blocking = backend & 0xC0 == 0xC0   # (a quarter of the inputs: a blocking fd, refused)
        os.set_blocking(device_side.fileno(), blocking)
        host_side.setblocking(False)
        if SNDBUFS[backend % 3]:
            device_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUFS[backend % 3])
        bad = blocking or header > 4096 or not max_frame or max_frame > 1 << 24 or not 1 <= max_pieces <= 1024
        try:
            thread = TxThread(device_side.fileno(), mem, queue, header=header, max_frame=max_frame,
                              max_pieces=max_pieces, threaded=False)
        except ValueError:
            assert bad, "a transmitter refused on a ring inside RAM with good parameters"
            return
        assert not bad, (header, max_frame, max_pieces, blocking)
        try:
            Harness(mem, sh, queue, thread, Model(queue, walker, header, max_frame, max_pieces), host_side,
                    device_side).run(r)
        finally:
            thread.close()
    finally:
        device_side.close()
        host_side.close()


class Harness:
    def __init__(self, mem: GuestMemory, sh: GuestMemory, queue: SplitQueue, thread: TxThread, model: Model,
                 host_side: socket.socket, device_side: socket.socket) -> None:
        self.mem, self.sh, self.queue, self.thread, self.model = mem, sh, queue, thread, model
        self.host_side, self.device_side = host_side, device_side
        self.fillers: list[bytes] = []                  # queued on the socket by the harness, oldest first
        self.held: list[DescriptorChain] = []          # popped by Python, not yet pushed
        self.used_end = queue.used_ring + 6 + 8 * queue.size

    def run(self, r: Reader) -> None:
        for _ in range(OPS):
            if not r.left:
                break
            op = r.u8()
            action = op & 7
            if action == 0:
                self.add_chains(r, op)
            elif action == 1 and not self.thread.serving:
                self.start()
            elif action == 2:
                self.pump()
            elif action == 3:
                self.take()
            elif action == 4 and self.thread.serving:
                self.stop()
            elif action == 5 and not self.thread.serving:
                if not self.serve_in_python(1 + (op >> 3 & 15), hold=bool(op & 0x80)):
                    return  # a broken ring: the device needs a reset
            elif action == 6:
                self.back_end(op)
            elif action == 7:
                self.poke(r, op)
        if self.thread.serving:
            self.stop()
        # the queue is Python's again: it serves on
        self.serve_in_python(2 * self.queue.size + 8, hold=False)

    # --- the driver ---------------------------------------------------------------------------

    def add_chains(self, r: Reader, op: int) -> None:
        """Write 1 to 4 chains and publish them in the available ring (the index maybe jumping)."""
        mem, queue = self.mem, self.queue
        index = mem.read_u16(queue.avail_ring + 2)
        for _ in range(1 + (op >> 3 & 3)):
            head = self.write_chain(r)
            mem.write_u16(queue.avail_ring + 4 + 2 * (index % queue.size), head & 0xFFFF)
            index = (index + 1) & 0xFFFF
        if op & 0x80:
            index = (index + r.u8()) & 0xFFFF
        mem.write_u16(queue.avail_ring + 2, index)

    def write_chain(self, r: Reader) -> int:
        """kind: 1-4 descriptors (bits 0-1), in an indirect table (2), one of them device-writable
        (3), the last one going on (4: below 0x80 to one of the chain's, a loop, else to that
        index, maybe outside the table), one buffer out of RAM (5), the ring's descriptor's flags
        (and an indirect one's length) from the input (6), a head out of the table (7). Then the
        head, the bytes those bits ask for, each descriptor's address and length, an indirect
        table's address."""
        mem, size = self.mem, self.queue.size
        kind = r.u8()
        n = 1 + (kind & 3)
        head = r.u8() % size
        if kind & 0x80:
            head = size + r.u8()
        writable = r.u8() % n if kind & 8 else -1
        outside = r.u8() % n if kind & 0x20 else -1
        raw_flags = r.u8() if kind & 0x40 else None
        onward = r.u8() if kind & 0x10 else None
        pieces = []
        for j in range(n):
            address, length = r.u32() % RAM, r.u16()
            length = length & 0x7FFF if length & 0x8000 else length & 0x7FF
            if j == outside:
                address = RAM - (length >> 1) if length > 1 else (1 << 40) + address
            flags = F_WRITE if j == writable else 0
            pieces.append([address, length, flags, 0])
        for j, piece in enumerate(pieces):
            if j + 1 < n:
                piece[2] |= F_NEXT
        if kind & 4:  # an indirect table: its entries 0..n-1
            table = min(r.u32() % RAM, RAM - 16 * n) & ~0xF
            for j, piece in enumerate(pieces):
                piece[3] = j + 1 if j + 1 < n else 0
            if onward is not None:
                pieces[-1][2] |= F_NEXT
                pieces[-1][3] = onward % n if onward < 0x80 else onward
            mem.write(table, b"".join(DESC.pack(*piece) for piece in pieces))
            entry = [table, 16 * n, F_INDIRECT, 0]
            if raw_flags is not None:
                entry[2], entry[1] = raw_flags, r.u16()
            mem.write(self.queue.desc_table + 16 * (head % size), DESC.pack(*entry))
            return head
        indexes = [(head + j) % size for j in range(n)]
        for j, piece in enumerate(pieces):
            piece[3] = indexes[j + 1] if j + 1 < n else 0
        if onward is not None:
            pieces[-1][2] |= F_NEXT
            pieces[-1][3] = indexes[onward % n] if onward < 0x80 else onward
        if raw_flags is not None:
            pieces[0][2] = raw_flags
        for j, piece in enumerate(pieces):
            mem.write(self.queue.desc_table + 16 * indexes[j], DESC.pack(*piece))
        return head

    def poke(self, r: Reader, op: int) -> None:
        """used_event, the avail flags, the avail index, or any bytes anywhere."""
        mem, queue = self.mem, self.queue
        what = op >> 3 & 3
        if what == 0:
            mem.write_u16(queue.avail_ring + 4 + 2 * queue.size, r.u16())
        elif what == 1:
            mem.write_u16(queue.avail_ring, r.u16())
        elif what == 2:
            mem.write_u16(queue.avail_ring + 2, r.u16())
        else:
            address = r.below(RAM)
            mem.write(address, r.take(min(r.u8() + 1, RAM - address)))

    # --- the back end ---------------------------------------------------------------------------

    def back_end(self, op: int) -> None:
        """Fill the device side's buffer, then free `op >> 3 & 15` of what filled it; or drain it."""
        if op & 0x80:
            self.drain_fillers()
            return
        for filler in FILLERS:
            while len(self.fillers) < 4096:
                try:
                    self.device_side.send(filler, socket.MSG_DONTWAIT)
                except OSError:
                    break
                self.fillers.append(filler)
        for _ in range(min(op >> 3 & 15, len(self.fillers))):
            assert self.receive() == self.fillers.pop(0)

    def drain_fillers(self) -> None:
        while self.fillers:
            assert self.receive() == self.fillers.pop(0)

    def receive(self) -> bytes | None:
        try:
            length = self.host_side.recv_into(_scratch, 0, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except BlockingIOError:
            return None
        assert length <= len(_scratch), length
        return bytes(_scratch[:length])

    # --- the transmitter ------------------------------------------------------------------------

    def start(self) -> None:
        _before[:] = self.mem.view(0, RAM)
        lent = self.thread.start()
        assert lent == (not self.held), "lent with requests in flight, or refused without"
        assert self.thread.serving == lent
        if lent:
            queue = self.queue
            self.model.start(queue.last_avail, queue.used_idx, queue.signalled_used)
        assert _before == self.mem.view(0, RAM), "start() wrote to guest RAM"

    def pump(self) -> None:
        """The model on a copy of RAM, then the transmitter (a kick, a pump) on RAM: the same."""
        self.snapshot()
        used_idx = self.model.used_idx
        served = self.model.pump(self.sh)
        self.thread.kick()
        self.thread.pump()
        self.compare("pump", used_idx, [head for head, _ in served])
        self.check_wire(served)
        readable = bool(select.select([self.thread.fd], [], [], 0)[0])
        assert readable == (self.model.eventfd > 0), ("report eventfd", readable, self.model.eventfd)

    def snapshot(self) -> None:
        """RAM as it is, in _before and in the model's copy."""
        ram = self.mem.view(0, RAM)
        _before[:] = ram
        self.sh.view(0, RAM)[:] = ram

    def compare(self, what: str, used_idx: int, heads: list[int]) -> None:
        """RAM after the transmitter is the model's. (The model writes inside the used ring only:
        where they differ, first whether the transmitter wrote outside it, then the used index
        and the elements naming the heads served, then the rest: the kick words.)"""
        _after[:] = self.mem.view(0, RAM)
        model = self.sh.view(0, RAM)
        if _after == model:
            return
        start, end = self.queue.used_ring, self.used_end
        if _before[:start] != _after[:start] or _before[end:] != _after[end:]:
            offset = next(i for i, (a, b) in enumerate(zip(_before, _after)) if a != b and not start <= i < end)
            raise AssertionError(f"{what}: guest RAM written at {offset:#x}, outside the used ring "
                                 f"{start:#x}+{end - start:#x}")
        used, size = self.queue.used_ring, self.queue.size
        index = int.from_bytes(_after[used + 2:used + 4], "little")
        assert index == self.model.used_idx, (f"{what}: used index", index, self.model.used_idx)
        for k, head in list(enumerate(heads))[-size:]:
            element = used + 4 + 8 * ((used_idx + k) % size)
            written = int.from_bytes(_after[element:element + 4], "little")
            assert written == head, (f"{what}: used element {k} names", written, "not the head served", head)
        offset = next(i for i, (a, b) in enumerate(zip(_after, model)) if a != b)
        raise AssertionError(f"{what}: RAM differs from the model's at {offset:#x} (used ring {used:#x}+"
                             f"{end - used:#x}, available ring {self.queue.avail_ring:#x}): {_after[offset]} "
                             f"not {model[offset]}")

    def check_wire(self, served: list[tuple[int, bytes]]) -> None:
        """What the back end received: the fillers queued before, then the served chains' bytes
        in order, each one or dropped (shorter than the header, or refused by the socket)."""
        self.drain_fillers()
        received = []
        while (frame := self.receive()) is not None:
            received.append(frame)
        at = sent = length = 0
        for _, frame in served:
            if not frame and not self.model.header:
                sent += 1  # (writev of nothing returns 0 before the socket: sent, and nothing received)
            elif len(frame) >= self.model.header and at < len(received) and received[at] == frame:
                at += 1
                sent += 1
                length += len(frame) - self.model.header
        assert at == len(received), ("the back end received what no served chain holds", received[at][:64],
                                     [frame[:16] for _, frame in served])
        self.model.frames += sent
        self.model.bytes += length
        self.model.dropped += len(served) - sent

    def take(self) -> None:
        try:
            count = int.from_bytes(os.read(self.thread.fd, 8), "little")
        except BlockingIOError:
            count = 0
        assert count == self.model.eventfd, ("report eventfd count", count, self.model.eventfd)
        self.model.eventfd = 0
        self.check_report(self.thread.take, self.model.take())
        if self.model_stopped_reported and self.thread.serving:
            self.stop()  # (as net.py: the queue given back is taken back)

    def check_report(self, take, expected) -> None:
        chains, frames, length, dropped, used_idx, stopped = expected
        queue = self.queue
        completed = queue.completed
        report = take()
        assert (report.frames, report.bytes, report.dropped) == (frames, length, dropped), (report, expected)
        assert queue.completed - completed == chains, ("chains", queue.completed - completed, chains)
        if chains:
            assert queue.used_idx == used_idx, ("used index reported", queue.used_idx, used_idx)
        if stopped == CHAIN:
            assert report.stopped in CHAIN_STOPS, report.stopped
        else:
            assert report.stopped == stopped, (report.stopped, stopped)
        self.model_stopped_reported = stopped is not None

    model_stopped_reported = False

    def stop(self) -> None:
        self.snapshot()
        indices = self.model.stop(self.sh)
        expected = self.model.take()
        self.check_report(self.thread.stop, expected)
        self.model_stopped_reported = False
        assert not self.thread.serving
        self.compare("stop", self.model.used_idx, [])
        assert (self.queue.last_avail, self.queue.used_idx) == indices, (
            "stop returned", (self.queue.last_avail, self.queue.used_idx), indices)

    # --- Python's queue -------------------------------------------------------------------------

    def serve_in_python(self, count: int, *, hold: bool) -> bool:
        """Pop and push as net.py's _send_available does (without sending); the held chains
        pushed first. False where the ring is broken (only then VirtqueueBroken)."""
        queue, mem = self.queue, self.mem
        for held in self.held:
            queue.push(held, 0)
        self.held.clear()
        try:
            for step in range(count):
                chain = queue.pop()
                if chain is None:
                    break
                if hold and step == count - 1:
                    self.held.append(chain)
                else:
                    queue.push(chain, 0)
            queue.needs_interrupt()
        except VirtqueueBroken:
            pending = (mem.read_u16(queue.avail_ring + 2) - queue.last_avail) & 0xFFFF
            head = mem.read_u16(queue.avail_ring + 4 + 2 * (queue.last_avail % queue.size))
            assert pending > queue.size or head >= queue.size or head in queue.in_flight, (
                "VirtqueueBroken on a ring that is not", pending, head)
            return False
        return True
