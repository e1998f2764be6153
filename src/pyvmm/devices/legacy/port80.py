"""Port 0x80, the POST/diagnostic port: firmware writes progress codes there and Linux
writes to it as an I/O delay (`io_delay=0x80`). Register with length 1."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ...persist import State

PORT = 0x80
PORT_COUNT = 1


class Port80:
    """Keeps the last byte written (reads return it) and counts writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_value = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        # Only the first port is ours; wider reads see nothing beyond it.
        return bytes((self.last_value,)) + b"\xff" * (size - 1) if size else b""

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self.last_value = data[0]
            self.writes += 1

    def save(self) -> Port80State:
        with self._lock:
            return Port80State(last_value=self.last_value, writes=self.writes)

    def restore(self, state: Port80State) -> None:
        with self._lock:
            self.last_value, self.writes = state.last_value, state.writes


@dataclass(frozen=True)
class Port80State(State):
    KIND = "port80"
    last_value: int
    writes: int

    def validate(self) -> None:
        self.check_range("last_value", 0, 0xFF)
        if self.writes < 0:
            self.fail("writes", f"{self.writes} is negative")
