"""virtio-net's receive thread (net_receiver.c through net_rx_thread.RxThread), without its
thread: rings and descriptor chains built from the input, frames of input-chosen lengths on a
socket pair, the queue lent, served (pump), taken back and lent again in an input-chosen order.
Allowed outcomes: the receiver refuses rings outside RAM (ValueError) or a lend it cannot take
(False); the queue's own errors (VirtqueueBroken / GuestMemoryError) once Python serves it.
Checked: every range reported written and every buffer handed back lies in guest RAM, held
chains are distinct and inside the ring, the used index moves by the chains reported, a partial
frame names held chains, and the queue taken back serves on in Python."""

from __future__ import annotations

import os
import socket
from collections import deque

from pyvmm.devices.virtio.net_rx_thread import C_MODULE, RxThread
from pyvmm.devices.virtio.queue import DescriptorChain, SplitQueue, VirtqueueBroken
from pyvmm.memory.guest_memory import GuestMemoryError

from .c_build import load_c_module
from .guest import fill, memory, program_queue
from .reader import Reader

HEADER = 12
PLAN = 32


_AVAILABLE = load_c_module(C_MODULE)


def one_input(data: bytes) -> None:
    if not _AVAILABLE:
        return  # not built: nothing of it to run
    r = Reader(data)
    mem = memory()
    queue = SplitQueue(256)
    program_queue(queue, r)
    event_idx = r.flag()
    want, max_pieces = r.choice((1, 1514, 8192, 65565)), r.choice((1, 2, 16, 1023))
    plan = r.take(PLAN)
    fill(mem, r)
    try:
        queue.activate(mem, event_idx=event_idx, indirect=False)
    except VirtqueueBroken:
        return
    device_side, host_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        os.set_blocking(device_side.fileno(), False)
        host_side.setblocking(False)
        try:
            thread = RxThread(device_side.fileno(), mem, queue, header=HEADER, want=want, max_pieces=max_pieces,
                              threaded=False)
        except ValueError:
            return  # a ring outside guest RAM
        mem.on_device_writes = lambda runs: _check_written(mem, runs)
        try:
            _serve(thread, queue, mem, host_side, plan)
        finally:
            mem.on_device_writes = None
            thread.close()
    finally:
        device_side.close()
        host_side.close()


def _serve(thread: RxThread, queue: SplitQueue, mem, host_side, plan: bytes) -> None:
    held: deque[DescriptorChain] = deque()
    for step, op in enumerate(plan):
        action = op & 3
        if action == 0:
            try:
                host_side.send(bytes((step + i) & 0xFF for i in range((op >> 2) * 1031 % 70000)))
            except (BlockingIOError, OSError):
                pass  # the socket's buffer is full, or a frame too long for it
        elif action == 1 and not thread.serving:
            before = list(held)
            if not thread.start(held):
                assert list(held) == before  # nothing lent
        elif action == 2 and thread.serving:
            used_before, completed_before = queue.used_idx, queue.completed
            thread.pump()
            thread.take()
            assert (queue.used_idx - used_before) & 0xFFFF == queue.completed - completed_before
        elif action == 3 and thread.serving:
            report, partial = thread.stop(held)
            _check_held(queue, mem, held)
            if partial is not None:
                assert 0 < partial.chains <= len(held) and len(partial.rest) <= partial.length
    if thread.serving:
        thread.stop(held)
        _check_held(queue, mem, held)
    # the queue is Python's again: it serves on
    try:
        for _ in range(8):
            chain = queue.pop()
            if chain is None:
                break
            queue.push(chain, 0)
        for chain in held:
            queue.push(chain, 0)
        queue.needs_interrupt()
    except (VirtqueueBroken, GuestMemoryError):
        return


def _check_written(mem, runs) -> None:
    for address, length in runs:
        assert length > 0 and mem.contains(address, length), (address, length)


def _check_held(queue: SplitQueue, mem, held: deque[DescriptorChain]) -> None:
    heads = [chain.head for chain in held]
    assert len(set(heads)) == len(heads) and all(head < queue.size for head in heads)
    assert set(queue.in_flight) == set(heads)
    for chain in held:
        for address, length in chain.writable:
            assert length > 0 and mem.contains(address, length), (address, length)
