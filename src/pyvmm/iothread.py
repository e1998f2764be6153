"""IoThread: one thread that waits on file descriptors and runs device work when they are ready.

Queue kicks arriving through KVM ioeventfds, TAP frames, vsock and console sockets all
become readable fds; the thread polls them and calls their handlers, so device work never
runs on a vCPU thread when the kernel can hand it over. A handler that raises stops the
loop's owner through `on_error` (the VM stops with a VMM error) instead of dying silently.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
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


class IoThread:
    def __init__(self, name: str = "pyvmm-io", on_error: Callable[[BaseException], None] | None = None) -> None:
        self.name = name
        self.on_error = on_error
        self._selector = selectors.DefaultSelector()
        self._wake = make_eventfd()
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

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

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback()` on the I/O thread (right away when not started yet or when on it)."""
        if self._thread is None or threading.current_thread() is self._thread:
            callback()
            return
        with self._lock:
            self._calls.append(callback)
        os.eventfd_write(self._wake, 1)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop and join the thread, then close the selector (the fds belong to their owners)."""
        if self._thread is not None and self._thread.is_alive():
            self._stopping = True
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
            while not self._stopping:
                for key, _ in self._selector.select():
                    if key.data is None:
                        drain_eventfd(self._wake)
                        self._run_calls()
                    elif not self._stopping:
                        key.data()
        except BaseException as exc:  # a device back-end failed: report it, do not vanish
            log.debug("%s failed", self.name, exc_info=True)
            if self.on_error is not None:
                self.on_error(exc)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            call()
