"""pyvmm's guest-to-VMM notification ports (layout.GUEST_NOTIFY_PORT, GUEST_STATUS_PORT).

The default guest's init writes, through /dev/port:
  +0 one byte 0x01 when init starts (the boot timer: what Firecracker's boot-timer device does);
  +1 one byte: the exit status of the command it ran, just before it powers off.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

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

    def save(self) -> dict:
        with self._lock:
            return {"init_started": self.init_started_at is not None, "command_status": self.command_status}

    def restore(self, state: dict) -> None:
        with self._lock:
            self.command_status = state.get("command_status")
