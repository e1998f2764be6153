"""Port 0x80, the POST/diagnostic port: firmware writes progress codes there and Linux
writes to it as an I/O delay (`io_delay=0x80`). Register with length 1.

Compiled with the hot modules (pyvmm/compiled.py): a write to it is a whole exit's device work,
and exit_roundtrip.py's port-I/O rows measure exactly that."""

from __future__ import annotations

from typing import Final

from .port80_state import Port80State

PORT: Final = 0x80
PORT_COUNT: Final = 1
# A read's answer, made once per value: building it at each read (a tuple, bytes of it, the
# padding, their concatenation) was a fifth of pyvmm's user-space work per read exit (perf).
_ONE_BYTE: Final = tuple(bytes((value,)) for value in range(256))


class Port80:
    """Keeps the last byte written (reads return it) and counts writes.

    No lock: a write is two stores under the GIL, which compiled code does not give up in
    between (perf put the lock at most of the device's work per exit); save() and restore()
    run with the VM paused. Only from source, with several vCPUs writing here at once, can a
    count be lost (the last value never is)."""

    def __init__(self) -> None:
        self.last_value = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        if size == 1:
            return _ONE_BYTE[self.last_value]
        # Only the first port is ours; wider reads see nothing beyond it.
        return _ONE_BYTE[self.last_value] + b"\xff" * (size - 1) if size else b""

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        self.last_value = data[0]
        self.writes += 1

    def save(self) -> Port80State:
        return Port80State(last_value=self.last_value, writes=self.writes)

    def restore(self, state: Port80State) -> None:
        self.last_value, self.writes = state.last_value, state.writes
