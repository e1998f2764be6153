"""The 8254 PIT's saved state (a module of its own: the PIT is compiled, see pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..persist import State

# A counter's access mode (control word bits 5:4), as a saved counter holds it.
ACCESS_LATCH: Final = 0
ACCESS_LSB: Final = 1
ACCESS_MSB: Final = 2
ACCESS_LOHI: Final = 3

# Port 0x61 (system control port B): what the PIT's state keeps of it.
PORT61_GATE2: Final = 0x01
PORT61_SPEAKER_DATA: Final = 0x02
PORT61_WRITABLE: Final = 0x0F  # gate, speaker, parity/channel-check enables (stored, no effect)
PORT61_REFRESH: Final = 0x10
PORT61_OUT2: Final = 0x20


@dataclass(frozen=True)
class PitCounterState(State):
    """One counter: its mode and count, the guest time its counting is based on, the next OUT
    edge, and the half-done reads, writes and latches."""
    KIND = "i8254_counter"
    gate: bool
    mode: int
    access: int
    bcd: bool
    reload: int
    loaded: bool
    triggered: bool
    null_count: bool
    base_ns: int
    base_ticks: int
    next_edge_tick: int | None
    write_msb_next: bool
    pending_lsb: int
    read_msb_next: bool
    latched_bytes: bytes
    latched_status: int | None

    def validate(self) -> None:
        self.check_range("mode", 0, 5)
        self.check_range("access", ACCESS_LSB, ACCESS_LOHI)
        self.check_range("reload", 1, 0x10000)
        self.check_range("pending_lsb", 0, 0xFF)
        if len(self.latched_bytes) > 2:
            self.fail("latched_bytes", f"{len(self.latched_bytes)} bytes, a latch holds 2")
        if self.latched_status is not None:
            self.check_range("latched_status", 0, 0xFF)
        self.check_range("base_ns", 0, 1 << 64)
        self.check_range("base_ticks", 0, 1 << 80)


@dataclass(frozen=True)
class PitState(State):
    KIND = "i8254"
    counters: tuple[PitCounterState, PitCounterState, PitCounterState]
    port61: int

    def validate(self) -> None:
        self.check_mask("port61", PORT61_WRITABLE)
