"""Port 0x80, the POST/diagnostic port: firmware writes progress codes there and Linux
writes to it as an I/O delay (`io_delay=0x80`). Register with length 1."""

from __future__ import annotations

import threading

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

    def save(self) -> dict:
        with self._lock:
            return {"last_value": self.last_value, "writes": self.writes}

    def restore(self, state: dict) -> None:
        value, writes = state.get("last_value"), state.get("writes", 0)
        if not isinstance(value, int) or not 0 <= value <= 0xFF or not isinstance(writes, int) or writes < 0:
            raise ValueError(f"port 0x80 state is malformed: {state!r}")
        with self._lock:
            self.last_value, self.writes = value, writes
