"""IoThread: one thread that waits on file descriptors and runs device work when they are ready.

Queue kicks arriving through KVM ioeventfds, TAP frames, vsock and console sockets all
become readable fds; the thread polls them and calls their handlers, so device work never
runs on a vCPU thread when the kernel can hand it over. A handler that raises stops the
loop's owner through `on_error` (the VM stops with a VMM error) instead of dying silently.
`pause()` lets the handler in progress finish, then holds the thread until `resume()`: a
paused VM's devices touch neither the guest nor its memory. `call_later()` runs a callback
on the thread after a delay (a rate limiter's refill): the wait is the select() timeout, no
polling, and a paused thread runs none until it resumes.

`yields=True` (the software CPU) makes the thread SCHED_BATCH: its wake-ups no longer preempt
the thread running on the CPU it wakes on. There, every kick wakes it from the one thread that
runs the guest, and the wake-up preempted that thread on a busy host: the guest stood still
until its kick was served, so a guest->host TCP stream got each packet's ACK before its next
write and sent every 1 KiB write as a packet of its own (issue 17). The guest now keeps running
while its kick is served, as on KVM, where the kick is an ioeventfd.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import selectors
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


def make_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drain_eventfd(fd: int) -> int:
    """Read (and so reset) an eventfd's counter; 0 when it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def yield_on_wake() -> None:
    """Make the calling thread SCHED_BATCH (it only lowers how eagerly the thread is run)."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:  # a host that refuses it: the thread works as before, only less kindly
        log.debug("cannot make the I/O thread SCHED_BATCH: %s", exc.strerror)


class TimerHandle:
    """A call_later() callback; cancel() before it runs and it never does."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class IoThread:
    def __init__(self, name: str = "pyvmm-io", on_error: Callable[[BaseException], None] | None = None, *,
                 yields: bool = False) -> None:
        self.name = name
        self.on_error = on_error
        self.yields = yields  # SCHED_BATCH (module docstring)
        self._selector = selectors.DefaultSelector()
        self._wake = make_eventfd()
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: list[Callable[[], object]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._hold = threading.Condition()
        self._pause_wanted = False
        self._held = False  # the thread is waiting in _wait_while_paused
        self._timers: list[tuple[int, int, TimerHandle]] = []  # a heap: (deadline ns, sequence, handle)
        self._sequence = itertools.count()
        # Run first in the thread (the Vm stacks the I/O thread's seccomp filter there).
        self.thread_init: Callable[[], None] | None = None
        # Threads doing the I/O thread's work elsewhere (a NIC's receive thread): held and let
        # go with it, as key -> (pause, resume).
        self._helpers: dict[object, tuple[Callable[[], None], Callable[[], None]]] = {}

    def hold_with(self, key: object, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """pause() runs each time the I/O thread is held, after it holds, and must return once
        that helper touches neither the guest nor its memory; resume() runs before it goes on."""
        with self._lock:
            self._helpers[key] = (pause, resume)

    def forget_helper(self, key: object) -> None:
        with self._lock:
            self._helpers.pop(key, None)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback()` on the I/O thread whenever `fd` is readable (level-triggered)."""
        self.call_soon(lambda: self._selector.register(fd, selectors.EVENT_READ, callback))

    def remove_reader(self, fd: int) -> None:
        def remove() -> None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass
        self.call_soon(remove)

    def add_eventfd(self, fd: int, callback: Callable[[], None]) -> None:
        """Like add_reader, for an eventfd: its counter is reset before `callback()` runs."""
        def on_ready() -> None:
            if drain_eventfd(fd):
                callback()
        self.add_reader(fd, on_ready)

    def call_soon(self, callback: Callable[[], object]) -> None:  # its result is dropped
        """Run `callback()` on the I/O thread (right away when not started yet or when on it)."""
        if self._thread is None or threading.current_thread() is self._thread:
            callback()
            return
        with self._lock:
            self._calls.append(callback)
        os.eventfd_write(self._wake, 1)

    def call_later(self, delay_ns: int, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback()` on the I/O thread once `delay_ns` have passed (monotonic clock).
        Before start() it waits for the thread; it is never called from here."""
        handle = TimerHandle(callback)
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic_ns() + max(0, delay_ns), next(self._sequence), handle))
        if self._thread is not None and threading.current_thread() is not self._thread and self._wake >= 0:
            os.eventfd_write(self._wake, 1)  # select() again with the new earliest deadline
        return handle

    def _timeout(self) -> float | None:
        with self._lock:
            if not self._timers:
                return None
            return max(0.0, (self._timers[0][0] - time.monotonic_ns()) / 1e9)

    def _run_timers(self) -> None:
        now = time.monotonic_ns()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for handle in due:
            callback, handle.callback = handle.callback, None
            if callback is not None:
                callback()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def pause(self) -> None:
        """Return once the thread has finished the handler it was in (if any) and waits; no
        handler runs until resume(). Readiness that arrives meanwhile is served after it."""
        thread = self._thread
        if thread is threading.current_thread():
            raise RuntimeError("the I/O thread cannot pause itself")
        with self._hold:
            self._pause_wanted = True
        if thread is not None:
            os.eventfd_write(self._wake, 1)  # out of select(), to the pause check
            with self._hold:
                while not self._held and thread.is_alive() and not self._stopping:
                    self._hold.wait(0.05)  # also notices a thread that ended on an error
        for pause, _ in self._helper_calls():
            pause()

    def resume(self) -> None:
        for _, resume in self._helper_calls():
            resume()
        with self._hold:
            self._pause_wanted = False
            self._hold.notify_all()

    def _helper_calls(self) -> list[tuple[Callable[[], None], Callable[[], None]]]:
        with self._lock:
            return list(self._helpers.values())

    def _wait_while_paused(self) -> None:
        with self._hold:
            self._held = True
            self._hold.notify_all()
            while self._pause_wanted and not self._stopping:
                self._hold.wait()
            self._held = False

    def stop(self) -> None:
        """Stop and join the thread, then close the selector (the fds belong to their owners)."""
        if self._thread is not None and self._thread.is_alive():
            with self._hold:
                self._stopping = True
                self._hold.notify_all()
            os.eventfd_write(self._wake, 1)
            if threading.current_thread() is not self._thread:
                self._thread.join()
        self._thread = None
        if self._wake >= 0:
            self._selector.close()
            os.close(self._wake)
            self._wake = -1

    def _run(self) -> None:
        try:
            if self.yields:
                yield_on_wake()
            if self.thread_init is not None:
                self.thread_init()
            while not self._stopping:
                if self._pause_wanted:
                    self._wait_while_paused()
                    continue
                registered = self._selector.get_map()
                for key, _ in self._selector.select(self._timeout()):
                    if self._pause_wanted:
                        break  # level-triggered: what is ready now is reported again after resume()
                    if key.data is None:
                        drain_eventfd(self._wake)
                        self._run_calls()
                    elif not self._stopping and registered.get(key.fd) is key:
                        # (a call run above may have removed it, and its owner closed the fd)
                        key.data()
                if not self._pause_wanted and not self._stopping:
                    self._run_timers()
        except BaseException as exc:  # a device back-end failed: report it, do not vanish
            log.debug("%s failed", self.name, exc_info=True)
            if self.on_error is not None:
                self.on_error(exc)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            call()


class WritableWatch:
    """One-shot "this fd can take bytes again" callbacks, run on the I/O thread.

    IoThread only waits for readable fds; an epoll set holding the waiting sockets is
    itself readable as soon as one of them becomes writable.
    """

    def __init__(self, iothread) -> None:
        self._iothread = iothread
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        iothread.add_reader(self._epoll.fileno(), self._on_ready)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            if fd not in self._callbacks:
                self._epoll.register(fd, select.EPOLLOUT)
            self._callbacks[fd] = callback

    def forget(self, fd: int) -> None:
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass

    def _on_ready(self) -> None:
        calls = []
        with self._lock:
            for fd, _ in self._epoll.poll(0):
                callback = self._callbacks.pop(fd, None)
                if callback is not None:
                    self._epoll.unregister(fd)
                    calls.append(callback)
        for callback in calls:  # outside our lock: callbacks take their device's lock
            callback()

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._iothread.remove_reader(self._epoll.fileno())
        self._iothread.call_soon(self._epoll.close)  # after the reader is gone, so the fd is not reused under it
