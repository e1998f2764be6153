"""MC146818 real-time clock and CMOS RAM, as on a PC: ports 0x70-0x71 (length 2), ISA IRQ 8.

    offset 0 (0x70)  index: bits 0-6 select a register, bit 7 is the PC's NMI mask (kept and
                     read back, otherwise ignored: nothing raises NMIs through it)
    offset 1 (0x71)  data: the selected register

Registers:

    0x00 seconds   0x01 alarm seconds   0x02 minutes   0x03 alarm minutes
    0x04 hours     0x05 alarm hours     0x06 weekday   0x07 day   0x08 month   0x09 year
    0x0A A  UIP (read-only) | DV2-0 divider | RS3-0 periodic rate
    0x0B B  SET | PIE | AIE | UIE | SQWE | DM (1 = binary) | 24/12 (1 = 24h) | DSE
    0x0C C  IRQF | PF | AF | UF, read-only; reading clears them and lowers the IRQ
    0x0D D  VRT (always 1: the battery is fine), read-only
    0x32    century (the index pyvmm's FADT announces, as on PCs)
    others  battery-backed RAM

The chip does not count by itself: the time is the host's UTC clock plus an offset the
guest moves by writing the time registers. As Linux does it, the guest sets SET (or resets
the divider, DV = 11x) to freeze the registers, writes them, and clears SET: the time it
wrote starts counting from that instant. A time register written while the clock runs moves
the time at once, keeping the fraction of the second. The weekday follows the date (Sunday
= 1); a weekday written while frozen reads back until the clock runs again. Any DV value but
11x runs the clock: Linux on AMD family 17h clears the DV bits for good after setting the time.
A change of DM or 24/12 shows at once while the clock runs; frozen registers keep their bytes
and are read in the new mode, as on the chip. The host clock is wall-clock time, so the RTC
keeps running while the VM is paused or saved, like a battery-backed chip.

Updates happen exactly at second boundaries; UIP reads 1 during the last 244 us before each,
the time the real chip warns in advance, so a reader that checks UIP around its reads (Linux's
mc146818_avoid_UIP) sees consistent values and finds UIP clear again a millisecond later.

Flags are computed from the clock when needed (reading C, a timer callback): UF for every
update, AF when an update matched the alarm (an alarm byte with bits 7-6 set matches any
value; otherwise bytes compare as encoded), PF at the periodic rate. Interrupts need a timer:
the device asks for a callback of `poll()` at a host-clock deadline through `timer(deadline_ns)`
(None cancels), armed only while an enabled event is due and IRQF is clear. Periodic
interrupts use the same timer; when its callbacks fall behind (rates up to 8192 Hz), missed
periods are merged into one interrupt. Without a timer the flags still work, and interrupts
are raised only when the guest reads C or writes A or B.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable

from ...bus.interrupt import IrqLine, NullIrqLine
from ...persist import State

log = logging.getLogger(__name__)

INDEX_PORT = 0
DATA_PORT = 1

CMOS_SIZE = 128
INDEX_MASK = 0x7F
NMI_DISABLE = 0x80

SECONDS = 0x00
ALARM_SECONDS = 0x01
MINUTES = 0x02
ALARM_MINUTES = 0x03
HOURS = 0x04
ALARM_HOURS = 0x05
WEEKDAY = 0x06
DAY = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)

A_UIP = 0x80
A_DV_MASK = 0x70
A_DV_RESET = 0x60        # DV = 11x holds the divider chain in reset: the clock stops
A_DV_32KHZ = 0x20
A_RS_MASK = 0x0F

B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01

C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
C_EVENTS = C_PF | C_AF | C_UF    # each flag sits at the bit of its enable in B

D_VRT = 0x80

HOUR_PM = 0x80
ALARM_DONT_CARE = 0xC0

# What a PC BIOS leaves: 32.768 kHz time base, 1024 Hz rate; 24-hour BCD, no interrupts.
POWER_ON_A = A_DV_32KHZ | 0x06
POWER_ON_B = B_24H

NS_PER_SECOND = 1_000_000_000
UIP_NS = 244_000
TIME_BASE_HZ = 32768
SECONDS_PER_DAY = 86400
# The RTC's range of days since 1970: 0001-01-01 to 9999-12-31 (a century register of 0-99).
_FIRST_DAY, _LAST_DAY = -719162, 2932896


# Dates by integer arithmetic (the proleptic Gregorian calendar in 400-year eras of 146097
# days, each year counted from March so that the leap day ends it): what the datetime module
# computes, without its import at every start.
def days_from_date(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to the date (negative before it)."""
    year -= month <= 2
    era, year_of_era = divmod(year, 400)
    day_of_year = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def date_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) `days` after 1970-01-01."""
    era, day_of_era = divmod(days + 719468, 146097)
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153  # 0 = March
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = shifted_month + 3 if shifted_month < 10 else shifted_month - 9
    return year_of_era + era * 400 + (month <= 2), month, day


def to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def from_bcd(value: int) -> int:
    # Not validated: the chip does not check either, so 0x5A reads as 60.
    return (value >> 4) * 10 + (value & 0x0F)


def periodic_shift(rate: int) -> int | None:
    """log2 of the periodic interrupt's period in 32.768 kHz clocks; None for rate 0 (off).
    Rates 1 and 2 repeat 8 and 9 (256 and 128 Hz), as on the chip."""
    if rate == 0:
        return None
    return rate + 6 if rate < 3 else rate - 1


class Mc146818Rtc:
    """`clock()` returns host UTC time in ns (`time.time_ns` unless a test injects one);
    `timer(deadline_ns)` asks for `poll()` to be called once `clock()` reaches the deadline
    (None: no call wanted). The timer is called with the device lock held: it must only
    record the deadline, never call back into the device."""

    def __init__(self, irq: IrqLine | None = None, *, clock: Callable[[], int] = time.time_ns,
                 timer: Callable[[int | None], None] | None = None) -> None:
        self._irq = irq or NullIrqLine()
        self._clock = clock
        self._timer = timer
        self._lock = threading.Lock()
        self._ram = bytearray(CMOS_SIZE)
        self._ram[REG_A] = POWER_ON_A
        self._ram[REG_B] = POWER_ON_B
        self._index = 0
        self._offset_ns = 0        # RTC time = clock() + offset, while the clock runs
        self._flags = 0            # register C
        self._checked_ns = self._clock()   # RTC time up to which events are in the flags
        self._irq_level = False
        self._armed_ns: int | None = None  # host-clock deadline last given to the timer

    # --- guest side ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            data = bytes(self._read_port(offset + i) for i in range(size))
            self._update_irq()
            self._arm_timer()
        return data

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                if offset + i == INDEX_PORT:
                    self._index = value
                elif offset + i == DATA_PORT:
                    self._write_register(self._index & INDEX_MASK, value)
            self._update_irq()
            self._arm_timer()

    def _read_port(self, port: int) -> int:
        if port == INDEX_PORT:
            return self._index
        if port == DATA_PORT:
            return self._read_register(self._index & INDEX_MASK)
        return 0xFF

    def _read_register(self, index: int) -> int:
        if index in TIME_REGISTERS and self._running():
            return self._time_bytes(self._now_ns() // NS_PER_SECOND)[index]
        if index == REG_A:
            return self._ram[REG_A] | (A_UIP if self._update_in_progress() else 0)
        if index == REG_C:
            self._catch_up()
            value, self._flags = self._flags, 0
            return value
        if index == REG_D:
            return D_VRT
        return self._ram[index]

    def _write_register(self, index: int, value: int) -> None:
        if index == REG_A:
            self._change_control(value & ~A_UIP & 0xFF, self._ram[REG_B])
        elif index == REG_B:
            if value & B_SET:
                value &= ~B_UIE  # as on the chip: SET clears UIE
            self._change_control(self._ram[REG_A], value)
        elif index in (REG_C, REG_D):
            pass  # read-only
        elif index in TIME_REGISTERS and self._running():
            self._set_time_register(index, value)
        else:
            self._ram[index] = value

    def _change_control(self, reg_a: int, reg_b: int) -> None:
        was_running = self._running()
        self._catch_up()  # events up to now count under the old settings
        if was_running and not self._runs_with(reg_a, reg_b):
            self._freeze()
        self._ram[REG_A], self._ram[REG_B] = reg_a, reg_b
        if not was_running and self._running():
            self._thaw()
        self._flags = self._with_irqf(self._flags)

    # --- time -----------------------------------------------------------------------------

    def _runs_with(self, reg_a: int, reg_b: int) -> bool:
        return not reg_b & B_SET and reg_a & A_DV_RESET != A_DV_RESET

    def _running(self) -> bool:
        return self._runs_with(self._ram[REG_A], self._ram[REG_B])

    def _now_ns(self) -> int:
        return self._clock() + self._offset_ns

    def _update_in_progress(self) -> bool:
        return self._running() and self._now_ns() % NS_PER_SECOND >= NS_PER_SECOND - UIP_NS

    def _freeze(self) -> None:
        """Hold the current time in the registers (SET or divider reset)."""
        for index, value in self._time_bytes(self._now_ns() // NS_PER_SECOND).items():
            self._ram[index] = value

    def _thaw(self) -> None:
        """Start counting from the time in the registers, at the start of its second."""
        start_ns = self._registers_to_seconds() * NS_PER_SECOND
        self._offset_ns = start_ns - self._clock()
        self._checked_ns = start_ns  # a time jump is not a run of updates
        log.debug("rtc: the guest's time now runs %+.3f s from the host's UTC", self._offset_ns / 1e9)

    def _set_time_register(self, index: int, value: int) -> None:
        self._catch_up()  # events up to now happened at the old time
        old = self._checked_ns // NS_PER_SECOND
        for i, byte in self._time_bytes(old).items():
            self._ram[i] = byte
        self._ram[index] = value
        delta_ns = (self._registers_to_seconds() - old) * NS_PER_SECOND
        self._offset_ns += delta_ns
        self._checked_ns += delta_ns

    def _encode(self, value: int) -> int:
        return value if self._ram[REG_B] & B_DM_BINARY else to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._ram[REG_B] & B_DM_BINARY else from_bcd(value)

    def _encode_hour(self, hour: int) -> int:
        if self._ram[REG_B] & B_24H:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)

    def _decode_hour(self, value: int) -> int:
        if self._ram[REG_B] & B_24H:
            return self._decode(value)
        return self._decode(value & ~HOUR_PM) % 12 + (12 if value & HOUR_PM else 0)

    def _time_bytes(self, seconds: int) -> dict[int, int]:
        """The time registers' values for RTC time `seconds` (since 1970, UTC by convention)."""
        days, second_of_day = divmod(seconds, SECONDS_PER_DAY)
        days = min(max(days, _FIRST_DAY), _LAST_DAY)
        year, month, day = date_from_days(days)
        hour, rest = divmod(second_of_day, 3600)
        minute, second = divmod(rest, 60)
        encode = self._encode
        return {
            SECONDS: encode(second), MINUTES: encode(minute), HOURS: self._encode_hour(hour),
            WEEKDAY: encode((days + 4) % 7 + 1), DAY: encode(day),  # 1 = Sunday; 1970-01-01 was a Thursday
            MONTH: encode(month), YEAR: encode(year % 100), CENTURY: encode(year // 100),
        }

    def _registers_to_seconds(self) -> int:
        """The time the registers hold; out-of-range fields are clamped (days roll over into
        the next month), since the guest may write anything."""
        ram, decode = self._ram, self._decode
        year = min(max(decode(ram[CENTURY]) * 100 + decode(ram[YEAR]), 1), 9999)
        month = min(max(decode(ram[MONTH]), 1), 12)
        day = min(max(decode(ram[DAY]), 1), 31)
        days = days_from_date(year, month, 1) + day - 1
        hour = min(self._decode_hour(ram[HOURS]), 23)
        minute = min(decode(ram[MINUTES]), 59)
        second = min(decode(ram[SECONDS]), 59)
        return days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second

    # --- events -------------------------------------------------------------------------------

    def _alarm_values(self) -> tuple[list[int], list[int], list[int]] | None:
        """The hours, minutes and seconds the alarm registers match; None if it never fires."""
        def matching(alarm: int, count: int, encode: Callable[[int], int]) -> list[int]:
            if alarm & ALARM_DONT_CARE == ALARM_DONT_CARE:
                return list(range(count))
            return [v for v in range(count) if encode(v) == alarm]

        hours = matching(self._ram[ALARM_HOURS], 24, self._encode_hour)
        minutes = matching(self._ram[ALARM_MINUTES], 60, self._encode)
        seconds = matching(self._ram[ALARM_SECONDS], 60, self._encode)
        return (hours, minutes, seconds) if hours and minutes and seconds else None

    def _next_alarm(self, after: int) -> int | None:
        """The first RTC second after `after` whose time of day matches the alarm."""
        values = self._alarm_values()
        if values is None:
            return None
        hours, minutes, seconds = values
        start = after + 1
        day, second_of_day = divmod(start, SECONDS_PER_DAY)
        h0, rest = divmod(second_of_day, 3600)
        m0, s0 = divmod(rest, 60)
        for h in hours[bisect_left(hours, h0):]:
            if h > h0:
                return day * SECONDS_PER_DAY + h * 3600 + minutes[0] * 60 + seconds[0]
            for m in minutes[bisect_left(minutes, m0):]:
                if m > m0:
                    return day * SECONDS_PER_DAY + h * 3600 + m * 60 + seconds[0]
                i = bisect_left(seconds, s0)
                if i < len(seconds):
                    return day * SECONDS_PER_DAY + h * 3600 + m * 60 + seconds[i]
        return (day + 1) * SECONDS_PER_DAY + hours[0] * 3600 + minutes[0] * 60 + seconds[0]

    def _catch_up(self) -> None:
        """Fold the updates, alarms and periods since the last check into the flags."""
        if not self._running():
            return
        now, last = self._now_ns(), self._checked_ns
        self._checked_ns = now
        if now <= last:
            return  # the host clock stepped back: start counting again from here
        now_s, last_s = now // NS_PER_SECOND, last // NS_PER_SECOND
        events = 0
        if now_s > last_s:
            events |= C_UF
            alarm = self._next_alarm(last_s)
            if alarm is not None and alarm <= now_s:
                events |= C_AF
        shift = periodic_shift(self._ram[REG_A] & A_RS_MASK)
        if shift is not None and _clocks(now) >> shift > _clocks(last) >> shift:
            events |= C_PF
        self._flags = self._with_irqf(self._flags | events)

    def _with_irqf(self, flags: int) -> int:
        # IRQF stays set until C is read, even if the enable is cleared meanwhile.
        if flags & self._ram[REG_B] & C_EVENTS:
            flags |= C_IRQF
        return flags

    def _next_event_ns(self) -> int | None:
        """RTC time of the next event that would raise the IRQ; None if none can."""
        enabled = self._ram[REG_B] & C_EVENTS
        if not enabled or self._flags & C_IRQF or not self._running():
            return None
        now = self._checked_ns
        now_s = now // NS_PER_SECOND
        due = []
        if enabled & C_UF:
            due.append((now_s + 1) * NS_PER_SECOND)
        if enabled & C_AF:
            alarm = self._next_alarm(now_s)
            if alarm is not None:
                due.append(alarm * NS_PER_SECOND)
        shift = periodic_shift(self._ram[REG_A] & A_RS_MASK)
        if enabled & C_PF and shift is not None:
            due.append(_ns_from_clocks(((_clocks(now) >> shift) + 1) << shift))
        return min(due) if due else None

    def _arm_timer(self, force: bool = False) -> None:
        if self._timer is None:
            return
        due = self._next_event_ns()
        deadline = None if due is None else due - self._offset_ns
        if force or deadline != self._armed_ns:
            self._armed_ns = deadline
            self._timer(deadline)

    def _update_irq(self, force: bool = False) -> None:
        level = bool(self._flags & C_IRQF)
        if force or level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    # --- host side ------------------------------------------------------------------------

    def poll(self) -> None:
        """The timer's callback: raise the IRQ for events now due, and arm the next one."""
        with self._lock:
            self._catch_up()
            self._update_irq()
            self._arm_timer(force=True)  # a callback that came early must be asked for again

    def time_ns(self) -> int:
        """The RTC's current time in ns since 1970 (what the guest reads, at full resolution)."""
        with self._lock:
            if self._running():
                return self._now_ns()
            return self._registers_to_seconds() * NS_PER_SECOND

    @property
    def irq_level(self) -> bool:
        with self._lock:
            return self._irq_level

    # --- lifecycle ----------------------------------------------------------------------

    def reset(self) -> None:
        """The chip's RESET pin (machine reset): interrupt enables, SQWE and flags clear; the
        time and the RAM are battery-backed and stay."""
        with self._lock:
            self._catch_up()
            self._ram[REG_B] &= ~(B_PIE | B_AIE | B_UIE | B_SQWE) & 0xFF
            self._flags = 0
            self._update_irq()
            self._arm_timer()

    def save(self) -> RtcState:
        with self._lock:
            self._catch_up()
            self._update_irq()
            self._arm_timer()
            return RtcState(ram=bytes(self._ram), index=self._index, offset_ns=self._offset_ns,
                            flags=self._flags, checked_ns=self._checked_ns)

    def restore(self, state: RtcState) -> None:
        """Load a `save()` result. The clock keeps its offset to the host's, so time spent
        saved counts as time passed (a battery-backed chip keeps running) and the events of
        that time are folded in from `checked_ns` on; the timer is armed at the deadline the
        saved chip had asked for (it follows from the registers, the offset and checked_ns)
        and the interrupt line is driven to the restored level."""
        with self._lock:
            self._ram = bytearray(state.ram)
            self._index = state.index
            self._offset_ns = state.offset_ns
            self._flags = self._with_irqf(state.flags)
            self._checked_ns = state.checked_ns
            self._update_irq(force=True)
            self._arm_timer(force=True)


@dataclass(frozen=True)
class RtcState(State):
    """The CMOS RAM (NVRAM, control registers and the time registers while frozen), the index
    register, the guest time's offset to the host's UTC clock, register C's flags and the RTC
    time up to which events are counted in them."""
    KIND = "mc146818"
    ram: bytes
    index: int
    offset_ns: int
    flags: int
    checked_ns: int

    def validate(self) -> None:
        if len(self.ram) != CMOS_SIZE:
            self.fail("ram", f"{len(self.ram)} bytes of CMOS, expected {CMOS_SIZE}")
        if self.ram[REG_A] & A_UIP:
            self.fail("ram", "register A has UIP set (it is computed, never stored)")
        self.check_range("index", 0, 0xFF)
        self.check_mask("flags", C_IRQF | C_EVENTS)


def _clocks(ns: int) -> int:
    """Whole 32.768 kHz time-base clocks in `ns`."""
    return ns * TIME_BASE_HZ // NS_PER_SECOND


def _ns_from_clocks(clocks: int) -> int:
    """The first ns by which `clocks` time-base clocks have passed."""
    return -(-clocks * NS_PER_SECOND // TIME_BASE_HZ)
