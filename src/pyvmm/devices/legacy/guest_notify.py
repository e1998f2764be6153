"""pyvmm's guest-to-VMM notification ports (layout.GUEST_NOTIFY_PORT, GUEST_STATUS_PORT).

The default guest's init writes, through /dev/port:
  +0 one byte 0x01 when init starts (the boot timer: what Firecracker's boot-timer device does);
  +1 one byte: the exit status of the command it ran, just before it powers off.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from ...persist import State

INIT_STARTED = 0x01
PORT_COUNT = 2


class GuestNotify:
    def __init__(self, on_init_started: Callable[[], None] | None = None) -> None:
        self._on_init_started = on_init_started
        self._lock = threading.Lock()
        self.init_started_at: float | None = None  # time.monotonic() of the event
        self.command_status: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if offset == 0 and data[0] == INIT_STARTED and self.init_started_at is None:
                self.init_started_at = time.monotonic()
                callback = self._on_init_started
            else:
                callback = None
                if offset == 1:
                    self.command_status = data[0]
        if callback is not None:
            callback()

    def save(self) -> GuestNotifyState:
        with self._lock:
            return GuestNotifyState(init_started=self.init_started_at is not None,
                                    command_status=self.command_status)

    def restore(self, state: GuestNotifyState) -> None:
        """The moment init started is this process's clock and is not carried over: a restored
        device remembers only that it did (so a second notice is ignored, as before the save)."""
        with self._lock:
            if not state.init_started:
                self.init_started_at = None
            elif self.init_started_at is None:
                self.init_started_at = time.monotonic()
            self.command_status = state.command_status


@dataclass(frozen=True)
class GuestNotifyState(State):
    KIND = "guest_notify"
    init_started: bool
    command_status: int | None

    def validate(self) -> None:
        if self.command_status is not None:
            self.check_range("command_status", 0, 0xFF)
