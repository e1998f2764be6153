"""8254 programmable interval timer (ports 0x40-0x43) and system control port B (0x61).

    0x40  counter 0 -> IRQ 0 (the `irq` line)     0x43  control word (write only)
    0x41  counter 1 (DRAM refresh; counts, drives nothing)
    0x42  counter 2 -> speaker; its GATE and OUT are bits 0 and 5 of port 0x61

The counters run at 1.193182 MHz of guest time. Nothing ticks: a counter remembers when it
was loaded (`base_ns`) and how many input clocks it had already counted then
(`base_ticks`); its value and OUT level are computed from the clock when read. Gate changes
re-base it.

Modes 0-5 are modelled, binary or BCD. Simplifications: a count takes effect when written
(no one-clock load delay), also in modes 2/3 where the chip would wait for the end of the
current period; mode 3 reads back approximately (the real chip counts by two with an odd
count quirk); the mode 4/5 strobe is reported at the terminal count, not one clock later.

IRQ 0: `poll(now_ns)` raises (with `irq.trigger()`) the rising edge of OUT0 that is due.
Lost ticks are discarded, as QEMU's lost_tick_policy=discard: one poll raises at most one
edge however many periods passed since the previous poll, and the next edge is the next
period boundary after `now_ns`. `next_deadline_ns(now_ns)` says when the next edge is due
(None when none will come without guest action), for the CPU loop to sleep until.

Single-threaded: port accesses and `poll` all come from the CPU thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Final

from ..bus.interrupt import IrqLine
from ..persist import require
from .pit_state import (
    ACCESS_LATCH, ACCESS_LOHI, ACCESS_LSB, ACCESS_MSB, PORT61_GATE2, PORT61_OUT2, PORT61_REFRESH, PORT61_SPEAKER_DATA,
    PORT61_WRITABLE, PitCounterState, PitState,
)

log = logging.getLogger(__name__)

PIT_HZ: Final = 1_193_182
NS_PER_SECOND: Final = 1_000_000_000
PORT_COUNT: Final = 4
CONTROL_PORT: Final = 3
REFRESH_TOGGLE_NS: Final = 15_085  # port 0x61 bit 4 toggles every ~15 us (DRAM refresh request)

READ_BACK: Final = 3  # channel field value selecting the read-back command


def _ticks(ns: int) -> int:
    """Whole input clocks in `ns` of guest time."""
    return ns * PIT_HZ // NS_PER_SECOND


def _ns_for_ticks(ticks: int) -> int:
    """The first ns by which `ticks` input clocks have passed."""
    return -(-ticks * NS_PER_SECOND // PIT_HZ)


def _to_bcd(value: int) -> int:
    return int(str(value % 10000), 16)


def _from_bcd(value: int) -> int:
    digits = [(value >> shift) & 0xF for shift in (12, 8, 4, 0)]
    return sum(min(d, 9) * 10 ** (3 - i) for i, d in enumerate(digits))  # invalid digits read as 9


class _Counter:
    """One counter. `now` is guest ns everywhere."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.gate = index != 2  # counters 0 and 1 have GATE tied high; 2 is port 0x61 bit 0
        self.mode = 0
        self.access = ACCESS_LOHI
        self.bcd = False
        self.reload = 0x10000  # N: the count as the counter uses it (0 written means 2^16 / 10^4)
        self.loaded = False    # a count was written since the last control word
        self.triggered = False  # modes 1/5: a gate rising edge started the count
        self.null_count = True
        self.base_ns = 0
        self.base_ticks = 0
        self.next_edge_tick: int | None = None  # elapsed-clock count of the next OUT rising edge
        self.write_msb_next = False
        self.pending_lsb = 0
        self.read_msb_next = False
        self.latched_bytes: list[int] = []
        self.latched_status: int | None = None

    # --- counting ---------------------------------------------------------------------------

    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 0x10000

    @property
    def periodic(self) -> bool:
        return self.mode in (2, 3)

    def running(self) -> bool:
        if not self.loaded:
            return False
        if self.mode in (1, 5):
            return self.triggered  # once triggered, GATE going low does not stop these modes
        return self.gate

    def elapsed(self, now: int) -> int:
        """Input clocks counted since the count was loaded (or reloaded by GATE)."""
        if not self.running():
            return self.base_ticks
        return self.base_ticks + _ticks(max(0, now - self.base_ns))

    def rebase(self, now: int) -> None:
        """Fold the clocks counted so far into base_ticks (before a gate change)."""
        self.base_ticks = self.elapsed(now)
        self.base_ns = now

    def value(self, now: int) -> int:
        """What the counting element holds now, in binary."""
        n = self.reload
        if not self.loaded:
            return n % self.modulus
        e = self.elapsed(now)
        if self.mode == 2:
            return (n - e % n) % self.modulus
        if self.mode == 3:
            first_half = (n + 1) // 2
            phase = e % n
            if phase >= first_half:
                phase -= first_half
            return max(0, n - 2 * phase) % self.modulus & ~1 & 0xFFFF
        if self.mode in (1, 5) and not self.triggered:
            return n % self.modulus
        return (n - e) % self.modulus

    def out(self, now: int) -> bool:
        mode, n = self.mode, self.reload
        if not self.loaded:
            return mode != 0  # after the control word: mode 0 OUT low, every other mode high
        if mode in (2, 3) and not self.gate:
            return True
        if mode in (1, 5) and not self.triggered:
            return True
        e = self.elapsed(now)
        if mode == 0:
            return e >= n
        if mode == 1:
            return e >= n
        if mode == 2:
            return e % n != n - 1 or n == 1
        if mode == 3:
            return e % n < (n + 1) // 2
        return e != n  # modes 4/5: a one-clock low strobe at terminal count

    def start(self, now: int) -> None:
        """(Re)load the count and start counting from it."""
        self.base_ns = now
        self.base_ticks = 0
        self.next_edge_tick = self.reload

    # --- bus interface ----------------------------------------------------------------------

    def write_control(self, access: int, mode: int, bcd: bool) -> None:
        self.access = access
        self.mode = mode
        self.bcd = bcd
        self.loaded = False
        self.triggered = False
        self.null_count = True
        self.next_edge_tick = None
        self.write_msb_next = False
        self.read_msb_next = False
        self.latched_bytes = []
        self.latched_status = None

    def write_count_byte(self, value: int, now: int) -> None:
        if self.access == ACCESS_LSB:
            self.load(value, now)
        elif self.access == ACCESS_MSB:
            self.load(value << 8, now)
        elif not self.write_msb_next:
            self.pending_lsb = value
            self.write_msb_next = True
            if self.mode == 0:
                # Writing the first byte of a mode-0 count stops the counter (OUT is low).
                self.rebase(now)
                self.loaded = False
                self.next_edge_tick = None
        else:
            self.write_msb_next = False
            self.load(value << 8 | self.pending_lsb, now)

    def load(self, raw: int, now: int) -> None:
        count = _from_bcd(raw) if self.bcd else raw
        self.reload = count or self.modulus
        if self.periodic and self.reload == 1:
            self.reload = 2  # a count of 1 is illegal in modes 2 and 3
        self.loaded = True
        self.null_count = False
        self.triggered = False
        self.start(now)
        if self.mode in (1, 5):
            self.next_edge_tick = None  # waits for a gate trigger

    def latch_count(self, now: int) -> None:
        if self.latched_bytes:
            return  # a latched count not yet read is kept
        value = self.value(now)
        if self.bcd:
            value = _to_bcd(value)
        if self.access == ACCESS_LSB:
            self.latched_bytes = [value & 0xFF]
        elif self.access == ACCESS_MSB:
            self.latched_bytes = [value >> 8 & 0xFF]
        else:
            self.latched_bytes = [value & 0xFF, value >> 8 & 0xFF]

    def latch_status(self, now: int) -> None:
        if self.latched_status is None:
            self.latched_status = ((0x80 if self.out(now) else 0) | (0x40 if self.null_count else 0)
                                   | self.access << 4 | self.mode << 1 | int(self.bcd))

    def read_byte(self, now: int) -> int:
        if self.latched_status is not None:
            status, self.latched_status = self.latched_status, None
            return status
        if self.latched_bytes:
            return self.latched_bytes.pop(0)
        value = self.value(now)
        if self.bcd:
            value = _to_bcd(value)
        if self.access == ACCESS_LSB:
            return value & 0xFF
        if self.access == ACCESS_MSB:
            return value >> 8 & 0xFF
        msb = self.read_msb_next
        self.read_msb_next = not msb
        return value >> 8 & 0xFF if msb else value & 0xFF

    def set_gate(self, gate: bool, now: int) -> None:
        if gate == self.gate:
            return
        self.rebase(now)
        rising = gate and not self.gate
        self.gate = gate
        if rising and self.loaded:
            if self.mode in (1, 5):
                self.triggered = True
                self.start(now)
            elif self.periodic:
                self.start(now)  # modes 2/3 reload on a gate rising edge
        self.base_ns = now

    # --- IRQ edges (counter 0) --------------------------------------------------------------

    def edge_due(self, now: int) -> bool:
        """Consume the OUT rising edge due by `now`, if any (at most one; missed ones dropped)."""
        if self.next_edge_tick is None or not self.running():
            return False
        e = self.elapsed(now)
        if e < self.next_edge_tick:
            return False
        if self.periodic:
            self.next_edge_tick = (e // self.reload + 1) * self.reload
        else:
            self.next_edge_tick = None
        return True

    def next_edge_ns(self) -> int | None:
        if self.next_edge_tick is None or not self.running():
            return None
        return self.base_ns + _ns_for_ticks(self.next_edge_tick - self.base_ticks)

    # --- snapshot ---------------------------------------------------------------------------

    _FIELDS = ("gate", "mode", "access", "bcd", "reload", "loaded", "triggered", "null_count", "base_ns",
               "base_ticks", "next_edge_tick", "write_msb_next", "pending_lsb", "read_msb_next",
               "latched_bytes", "latched_status")

    def save(self) -> PitCounterState:
        return PitCounterState(**{name: getattr(self, name) for name in self._FIELDS if name != "latched_bytes"},
                               latched_bytes=bytes(self.latched_bytes))

    def restore(self, state: PitCounterState) -> None:
        for name in self._FIELDS:
            if name != "latched_bytes":  # (saved as bytes, held as a list)
                setattr(self, name, getattr(state, name))
        self.latched_bytes = list(state.latched_bytes)


class SystemControlPortB:
    """Port 0x61 as the PIT sees it: GATE2 and speaker enable in, OUT2 and the refresh toggle out."""

    def __init__(self, pit: "Pit8254") -> None:
        self._pit = pit

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._pit._read_port61() if offset + i == 0 else 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and data:
            self._pit._write_port61(data[0])


class Pit8254:
    """The 8254 (a bus device for ports 0x40-0x43) plus `port61`, the device for port 0x61."""

    def __init__(self, irq: IrqLine, clock: Callable[[], int]) -> None:
        self._irq = irq
        self._clock = clock
        self.counters = [_Counter(i) for i in range(3)]
        self._port61 = 0
        self.port61 = SystemControlPortB(self)
        self.irq_edges = 0  # IRQ 0 edges raised, for tests and statistics

    # --- ports 0x40-0x43 --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        now = self._clock()
        out = bytearray()
        for i in range(size):
            port = offset + i
            if port < CONTROL_PORT:
                out.append(self.counters[port].read_byte(now))
            else:
                out.append(0xFF)  # the control word register cannot be read
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        now = self._clock()
        for i, value in enumerate(data):
            port = offset + i
            if port < CONTROL_PORT:
                self.counters[port].write_count_byte(value, now)
            elif port == CONTROL_PORT:
                self._write_control(value, now)

    def _write_control(self, value: int, now: int) -> None:
        channel = value >> 6
        if channel == READ_BACK:
            latch_count = not value & 0x20
            latch_status = not value & 0x10
            for index in range(3):
                if value & (2 << index):
                    if latch_count:
                        self.counters[index].latch_count(now)
                    if latch_status:
                        self.counters[index].latch_status(now)
            return
        counter = self.counters[channel]
        access = value >> 4 & 3
        if access == ACCESS_LATCH:
            counter.latch_count(now)
            return
        mode = value >> 1 & 7
        if mode > 5:
            mode -= 4  # 110 and 111 are aliases of modes 2 and 3
        counter.write_control(access, mode, bool(value & 1))
        log.debug("pit: counter %d mode %d access %d%s", channel, mode, access, " BCD" if value & 1 else "")

    # --- port 0x61 --------------------------------------------------------------------------

    def _read_port61(self) -> int:
        now = self._clock()
        value = self._port61 & PORT61_WRITABLE
        if (now // REFRESH_TOGGLE_NS) & 1:
            value |= PORT61_REFRESH
        if self.counters[2].out(now):
            value |= PORT61_OUT2
        return value

    def _write_port61(self, value: int) -> None:
        self._port61 = value & PORT61_WRITABLE
        self.counters[2].set_gate(bool(value & PORT61_GATE2), self._clock())

    @property
    def speaker_enabled(self) -> bool:
        return bool(self._port61 & PORT61_SPEAKER_DATA) and self.counters[2].gate

    # --- time -------------------------------------------------------------------------------

    def poll(self, now_ns: int) -> None:
        """Raise IRQ 0 if counter 0's OUT has had a rising edge due by `now_ns` (one at most)."""
        if self.counters[0].edge_due(now_ns):
            self.irq_edges += 1
            self._irq.trigger()

    def next_deadline_ns(self, now_ns: int | None = None) -> int | None:
        """When the next IRQ 0 edge is due (guest ns), or None if none is scheduled."""
        return self.counters[0].next_edge_ns()

    def out(self, channel: int, now_ns: int) -> bool:
        """The OUT pin of `channel` at `now_ns`."""
        return self.counters[channel].out(now_ns)

    # --- lifecycle --------------------------------------------------------------------------

    def reset(self) -> None:
        self.counters = [_Counter(i) for i in range(3)]
        self._port61 = 0

    def save(self) -> PitState:
        first, second, third = (c.save() for c in self.counters)
        return PitState(counters=(first, second, third), port61=self._port61)

    def restore(self, state: PitState) -> None:
        state = require(state, PitState)
        fresh = [_Counter(i) for i in range(3)]
        for counter, saved in zip(fresh, state.counters):
            counter.restore(saved)
        self.counters = fresh
        self._port61 = state.port61
