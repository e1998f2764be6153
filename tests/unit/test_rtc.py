"""MC146818 RTC (devices/legacy/rtc.py), driven through ports 0x70/0x71 the way Linux's
drivers/rtc/rtc-mc146818-lib.c and rtc-cmos.c do, on a fake host clock and a fake timer."""

import calendar
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64 import acpi
from pyvmm.devices.legacy import Mc146818Rtc
from pyvmm.devices.legacy import rtc as chip
from helpers.irq import RecordingIrq
from helpers.state import changed, tampered, through_json
from pyvmm.devices.legacy.rtc import RtcState
from pyvmm.persist import StateError

INDEX, DATA = 0, 1
NS = 1_000_000_000
MS = 1_000_000
NO_PULSE = "the RTC drives a level, it does not pulse"  # what a pulse on its interrupt line would mean
# 2026-11-21 20:42:09 UTC, a Saturday.
T0 = 1795293729
UIP, SET, PIE, AIE, UIE, DM_BINARY, H24 = 0x80, 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
IRQF, PF, AF, UF = 0x80, 0x40, 0x20, 0x10


class FakeClock:
    """Host UTC in ns; moves only when told, plus `step` ns on every reading if set."""

    def __init__(self, seconds, fraction_ns=0):
        self.ns = seconds * NS + fraction_ns
        self.step = 0

    def __call__(self):
        now = self.ns
        self.ns += self.step
        return now

    def advance(self, ns):
        self.ns += ns


class FakeTimer:
    def __init__(self):
        self.deadline = None
        self.calls = 0

    def __call__(self, deadline_ns):
        self.deadline = deadline_ns
        self.calls += 1


class Machine:
    """The chip plus the CMOS_READ/CMOS_WRITE a driver uses."""

    def __init__(self, seconds=T0, fraction_ns=0):
        self.clock = FakeClock(seconds, fraction_ns)
        self.timer = FakeTimer()
        self.irq = RecordingIrq(level_only=NO_PULSE)
        self.rtc = Mc146818Rtc(self.irq, clock=self.clock, timer=self.timer)

    def read(self, index):
        self.rtc.write(INDEX, bytes((index,)))
        return self.rtc.read(DATA, 1)[0]

    def write(self, value, index):
        self.rtc.write(INDEX, bytes((index,)))
        self.rtc.write(DATA, bytes((value,)))

    def fire_timer(self):
        """Move the host clock to the armed deadline and call the device back (a one-shot:
        the deadline is used up)."""
        deadline, self.timer.deadline = self.timer.deadline, None
        assert deadline is not None, "no timer armed"
        self.clock.ns = max(self.clock.ns, deadline)
        self.rtc.poll()


def bcd(value):
    return (value // 10) << 4 | value % 10


def unbcd(value):
    return (value >> 4) * 10 + (value & 0x0F)


def avoid_uip(m, callback):
    """mc146818_avoid_UIP: up to 10 tries, an mdelay(1) whenever UIP is seen."""
    for _ in range(10):
        seconds = m.read(chip.SECONDS)
        if m.read(chip.REG_A) & UIP:
            m.clock.advance(MS)
            continue
        if seconds != m.read(chip.SECONDS):
            continue
        result = callback(seconds)
        if m.read(chip.REG_A) & UIP:
            m.clock.advance(MS)
            continue
        if seconds != m.read(chip.SECONDS):
            continue
        return result
    return None


def get_time(m):
    """mc146818_get_time with the FADT's century register: (year, month, day, h, m, s), or
    None where Linux gives up ("Unable to read current time from RTC")."""
    def callback(seconds):
        return dict(sec=seconds, min=m.read(chip.MINUTES), hour=m.read(chip.HOURS), day=m.read(chip.DAY),
                    mon=m.read(chip.MONTH), year=m.read(chip.YEAR), ctrl=m.read(chip.REG_B),
                    century=m.read(acpi.CMOS_RTC_CENTURY))

    p = avoid_uip(m, callback)
    if p is None:
        return None
    if not p["ctrl"] & DM_BINARY:
        p = {k: (v if k == "ctrl" else unbcd(v)) for k, v in p.items()}
    return (p["century"] * 100 + p["year"], p["mon"], p["day"], p["hour"], p["min"], p["sec"])


def set_time(m, year, month, day, hour, minute, second):
    """mc146818_set_time (Intel path: the divider is held in reset while SET is on)."""
    century, year = divmod(year, 100)
    values = [year, month, day, hour, minute, second, century]
    if not m.read(chip.REG_B) & DM_BINARY:
        values = [bcd(v) for v in values]
    save_control = m.read(chip.REG_B)
    m.write(save_control | SET, chip.REG_B)
    save_freq_select = m.read(chip.REG_A)
    m.write(save_freq_select | 0x70, chip.REG_A)
    for index, value in zip((chip.YEAR, chip.MONTH, chip.DAY, chip.HOURS, chip.MINUTES, chip.SECONDS,
                             acpi.CMOS_RTC_CENTURY), values):
        m.write(value, index)
    m.write(save_control, chip.REG_B)
    m.write(save_freq_select, chip.REG_A)


def enable_irq(m, mask):
    """rtc-cmos's cmos_irq_enable: flush stale flags, set the enable, check again."""
    control = m.read(chip.REG_B)
    m.read(chip.REG_C)
    m.write(control | mask, chip.REG_B)
    return m.read(chip.REG_C)


# --- reading the time -------------------------------------------------------------------------


def test_power_on_state_is_what_a_bios_leaves():
    m = Machine()
    assert m.read(chip.REG_A) == 0x26          # 32.768 kHz, 1024 Hz
    assert m.read(chip.REG_B) == H24           # 24-hour BCD, no interrupts (rtc-cmos needs 24h)
    assert m.read(chip.REG_C) == 0
    assert m.read(chip.REG_D) == 0x80          # VRT; bit 6 clear ("not accessible" otherwise)


def test_reads_host_utc_in_bcd():
    m = Machine(fraction_ns=400 * MS)
    assert get_time(m) == (2026, 11, 21, 20, 42, 9)
    assert m.read(chip.SECONDS) == 0x09 and m.read(chip.HOURS) == 0x20 and m.read(chip.YEAR) == 0x26
    assert m.read(acpi.CMOS_RTC_CENTURY) == 0x20
    assert m.read(chip.WEEKDAY) == 7            # Saturday; Sunday is 1


def test_reads_binary_when_dm_is_set():
    m = Machine()
    m.write(H24 | DM_BINARY, chip.REG_B)
    assert get_time(m) == (2026, 11, 21, 20, 42, 9)
    assert [m.read(i) for i in (chip.SECONDS, chip.MINUTES, chip.HOURS, chip.YEAR)] == [9, 42, 20, 26]
    assert m.read(acpi.CMOS_RTC_CENTURY) == 20


@pytest.mark.parametrize("hour, bcd_byte, binary_byte", [
    (0, 0x12, 12),               # midnight is 12 AM
    (9, 0x09, 9),
    (12, 0x92, 0x80 | 12),       # noon is 12 PM
    (23, 0x91, 0x80 | 11),       # 11 PM: the PM bit on top of the 12-hour value
])
def test_12_hour_mode_with_the_pm_bit(hour, bcd_byte, binary_byte):
    m = Machine(T0 - 20 * 3600 + hour * 3600)
    m.write(0, chip.REG_B)
    assert m.read(chip.HOURS) == bcd_byte
    m.write(DM_BINARY, chip.REG_B)
    assert m.read(chip.HOURS) == binary_byte
    # Written back in 12-hour form, the time is the same (read in 24-hour form).
    m.write(DM_BINARY | SET, chip.REG_B)
    m.write(binary_byte, chip.HOURS)
    m.write(DM_BINARY, chip.REG_B)
    m.write(DM_BINARY | H24, chip.REG_B)
    assert m.read(chip.HOURS) == hour


def test_a_mode_change_while_set_does_not_convert_the_registers():
    m = Machine()                               # 20:42:09
    m.write(DM_BINARY | H24 | SET, chip.REG_B)  # the registers still hold BCD 0x20 ...
    m.write(DM_BINARY | H24, chip.REG_B)        # ... which binary mode reads as 32 o'clock
    assert m.read(chip.HOURS) == 23             # clamped: a nonsense hour is not refused


def test_the_time_follows_the_host_clock():
    m = Machine(fraction_ns=900 * MS)
    m.clock.advance((3 * 3600 + 17 * 60 + 49) * NS + 200 * MS)   # 23:59:59.100 the same day
    assert get_time(m) == (2026, 11, 21, 23, 59, 59)
    m.clock.advance(NS)
    assert get_time(m) == (2026, 11, 22, 0, 0, 0)
    assert m.read(chip.WEEKDAY) == 1


# --- update in progress ------------------------------------------------------------------------


def test_uip_is_set_just_before_each_update_only():
    m = Machine(fraction_ns=NS - 100_000)       # 100 us before the update
    assert m.read(chip.REG_A) & UIP
    m.clock.advance(200_000)                    # the update happened
    assert not m.read(chip.REG_A) & UIP
    m.clock.ns = T0 * NS + 500 * MS
    assert not m.read(chip.REG_A) & UIP
    m.clock.ns = T0 * NS + NS - 100_000
    m.write(H24 | SET, chip.REG_B)              # no updates while SET
    assert not m.read(chip.REG_A) & UIP
    m.write(0xFF, chip.REG_A)                   # UIP is read-only
    m.write(H24, chip.REG_B)
    assert m.read(chip.REG_A) == 0x7F


def test_linux_reads_a_consistent_time_across_an_update():
    m = Machine(fraction_ns=NS - 150_000)       # inside the UIP window
    m.clock.step = 20_000                       # each port access takes 20 us
    assert get_time(m) == (2026, 11, 21, 20, 42, 10)
    for start in range(NS - 400_000, NS, 10_000):  # every phase near the update
        m.clock.ns = T0 * NS + start
        assert get_time(m) in ((2026, 11, 21, 20, 42, 9), (2026, 11, 21, 20, 42, 10)), start


# --- setting the time ------------------------------------------------------------------------------


def test_set_time_with_set_then_read_it_back_moved_by_host_time():
    m = Machine(fraction_ns=700 * MS)
    set_time(m, 2031, 2, 3, 4, 5, 6)
    assert get_time(m) == (2031, 2, 3, 4, 5, 6)
    assert m.read(chip.WEEKDAY) == 2            # Monday
    m.clock.advance(90 * NS + 250 * MS)
    assert get_time(m) == (2031, 2, 3, 4, 6, 36)
    assert m.rtc.time_ns() == (1927857906 + 90) * NS + 250 * MS  # counting started at the set


def test_registers_hold_still_while_set():
    m = Machine()
    m.write(H24 | SET, chip.REG_B)
    m.clock.advance(5 * NS)
    assert m.read(chip.SECONDS) == 0x09
    m.write(0x30, chip.SECONDS)
    m.clock.advance(5 * NS)
    assert m.read(chip.SECONDS) == 0x30         # what was written, not the host's time
    m.write(H24, chip.REG_B)
    m.clock.advance(2 * NS)
    assert get_time(m) == (2026, 11, 21, 20, 42, 32)


def test_a_reset_divider_stops_the_clock_and_other_dv_values_run_it():
    m = Machine()
    m.write(0x76, chip.REG_A)                   # DV = 111: divider reset
    m.clock.advance(10 * NS)
    assert m.read(chip.SECONDS) == 0x09
    m.write(0x26, chip.REG_A)
    m.clock.advance(NS)
    assert m.read(chip.SECONDS) == 0x10
    m.write(0x06, chip.REG_A)                   # DV = 000, as Linux leaves it on AMD family 17h
    m.clock.advance(NS)
    assert m.read(chip.SECONDS) == 0x11


def test_writing_a_time_register_while_running_moves_the_time():
    m = Machine(fraction_ns=600 * MS)
    m.write(0x15, chip.MINUTES)
    assert get_time(m) == (2026, 11, 21, 20, 15, 9)
    m.clock.advance(400 * MS)                   # the fraction of the second was kept
    assert get_time(m) == (2026, 11, 21, 20, 15, 10)


def test_the_century_register_is_part_of_the_time():
    m = Machine()
    set_time(m, 2126, 11, 21, 20, 42, 9)
    assert m.read(acpi.CMOS_RTC_CENTURY) == 0x21 and m.read(chip.YEAR) == 0x26
    assert m.rtc.time_ns() == calendar.timegm((2126, 11, 21, 20, 42, 9)) * NS


def test_nonsense_dates_are_clamped_not_refused():
    m = Machine()
    m.write(H24 | SET, chip.REG_B)
    for index, value in ((chip.MONTH, 0x02), (chip.DAY, 0x31), (chip.HOURS, 0x99), (chip.MINUTES, 0xFF),
                         (chip.SECONDS, 0xAA), (chip.YEAR, 0x00), (acpi.CMOS_RTC_CENTURY, 0x00)):
        m.write(value, index)
    m.write(H24, chip.REG_B)
    year, month, day, *_ = get_time(m)
    assert (year, month, day) == (1, 3, 3)     # year 0 -> 1; Feb 31 rolls over into March


# --- interrupts -------------------------------------------------------------------------------------


def test_alarm_with_aie_raises_the_line_and_reading_c_clears_it():
    m = Machine(fraction_ns=300 * MS)
    m.write(0x12, chip.ALARM_SECONDS)           # 20:42:12, three updates away
    m.write(0x42, chip.ALARM_MINUTES)
    m.write(0x20, chip.ALARM_HOURS)
    assert m.timer.deadline is None             # nothing enabled, nothing to wait for
    assert enable_irq(m, AIE) == 0
    assert m.timer.deadline == (T0 + 3) * NS
    m.clock.advance(NS)
    m.timer.deadline = None                     # the timer called back early:
    m.rtc.poll()                                # an update, but not the alarm
    assert not m.irq.high and m.timer.deadline == (T0 + 3) * NS
    m.fire_timer()
    assert m.irq.high
    assert m.read(chip.REG_C) == IRQF | PF | AF | UF
    assert not m.irq.high
    assert m.read(chip.REG_C) == 0
    assert m.timer.deadline == (T0 + 3 + 86400) * NS   # the same time tomorrow


def test_alarm_dont_care_bytes_match_every_value():
    m = Machine()
    m.write(0x30, chip.ALARM_SECONDS)
    m.write(0xC0, chip.ALARM_MINUTES)
    m.write(0xFF, chip.ALARM_HOURS)
    enable_irq(m, AIE)
    assert m.timer.deadline == (T0 - 9 + 30) * NS      # 20:42:30
    m.fire_timer()
    m.read(chip.REG_C)
    assert m.timer.deadline == (T0 - 9 + 90) * NS      # 20:43:30


def test_alarm_compares_bytes_in_the_current_mode():
    m = Machine()
    m.write(0x0A, chip.ALARM_SECONDS)           # not BCD: never matches in BCD mode
    m.write(0xFF, chip.ALARM_MINUTES)
    m.write(0xFF, chip.ALARM_HOURS)
    enable_irq(m, AIE)
    assert m.timer.deadline is None
    m.write(H24 | DM_BINARY | AIE, chip.REG_B)  # in binary it is second 10
    assert m.timer.deadline == (T0 + 1) * NS


def test_update_interrupts_come_once_a_second():
    m = Machine(fraction_ns=250 * MS)
    enable_irq(m, UIE)
    for second in range(1, 4):
        assert m.timer.deadline == (T0 + second) * NS
        m.fire_timer()
        assert m.irq.high
        assert m.read(chip.REG_C) & (IRQF | UF) == IRQF | UF
        assert not m.irq.high
    assert m.irq.levels == [True, False] * 3


def test_set_clears_uie_and_holds_interrupts():
    m = Machine()
    enable_irq(m, UIE)
    m.write(m.read(chip.REG_B) | SET, chip.REG_B)
    assert not m.read(chip.REG_B) & UIE
    assert m.timer.deadline is None


def test_periodic_interrupts_at_the_rate_in_register_a():
    m = Machine(fraction_ns=100 * MS)
    m.write(0x2F, chip.REG_A)                   # RS = 15: 2 Hz
    enable_irq(m, PIE)
    assert m.timer.deadline == T0 * NS + 500 * MS
    m.fire_timer()
    assert m.irq.high and m.read(chip.REG_C) == IRQF | PF
    assert m.timer.deadline == (T0 + 1) * NS
    m.write(0x26, chip.REG_A)                   # 1024 Hz
    assert m.timer.deadline == T0 * NS + 500 * MS + 976_563   # ceil(1e9 / 1024)


def test_flags_are_kept_without_enables_and_never_raise_the_line():
    m = Machine()
    m.write(0x10, chip.ALARM_SECONDS)
    m.write(0xFF, chip.ALARM_MINUTES)
    m.write(0xFF, chip.ALARM_HOURS)
    m.write(0x20, chip.REG_A)                   # no periodic rate
    m.clock.advance(5 * NS)
    m.rtc.poll()
    assert m.read(chip.REG_C) == AF | UF        # no IRQF: nothing was enabled
    assert m.irq.levels == [] and m.timer.deadline is None
    assert m.read(chip.REG_C) == 0
    # A flag already set interrupts as soon as its enable is set.
    m.clock.advance(NS)
    m.write(H24 | UIE, chip.REG_B)
    assert m.irq.high


def test_machine_reset_clears_enables_and_flags_but_keeps_the_time():
    m = Machine()
    set_time(m, 2031, 2, 3, 4, 5, 6)
    enable_irq(m, UIE)
    m.fire_timer()
    assert m.irq.high
    m.rtc.reset()
    assert not m.irq.high and m.read(chip.REG_B) == H24 and m.read(chip.REG_C) == 0
    assert get_time(m)[:3] == (2031, 2, 3)


# --- RAM, index, guest mistakes ----------------------------------------------------------------


def test_nvram_is_plain_storage():
    m = Machine()
    indexes = [i for i in range(0x0E, 0x80) if i != acpi.CMOS_RTC_CENTURY]
    for i in indexes:
        m.write(i ^ 0x5A, i)
    assert [m.read(i) for i in indexes] == [i ^ 0x5A for i in indexes]
    m.write(0x00, chip.REG_D)
    m.write(0xFF, chip.REG_C)
    assert m.read(chip.REG_D) == 0x80 and m.read(chip.REG_C) == 0


def test_the_index_keeps_the_nmi_bit_and_is_masked_to_seven_bits():
    m = Machine()
    m.write(0x77, 0x80 | 0x40)                  # NMI disabled, register 0x40
    assert m.rtc.read(INDEX, 1)[0] == 0xC0
    assert m.read(0x40) == 0x77
    m.write(0x99, 0xFF)
    assert m.read(0x7F) == 0x99
    m.rtc.write(INDEX, bytes((0x80 | chip.SECONDS,)))
    assert m.rtc.read(DATA, 1)[0] == 0x09


def test_word_accesses_reach_index_then_data():
    m = Machine()
    m.rtc.write(INDEX, bytes((0x20, 0xAB)))      # outw 0x70: index 0x20, data 0xAB
    assert m.read(0x20) == 0xAB
    m.rtc.write(INDEX, bytes((0x20,)))
    assert m.rtc.read(INDEX, 2) == bytes((0x20, 0xAB))


@given(st.lists(st.tuples(st.integers(0, 1), st.binary(min_size=1, max_size=2)), max_size=60))
def test_guest_writes_never_raise(accesses):
    m = Machine()
    for port, data in accesses:
        m.rtc.write(port, data)
        m.rtc.read(port, len(data))
        m.clock.advance(300 * MS)
        m.rtc.poll()
    for index in range(0x80):
        m.read(index)


# --- save / restore ----------------------------------------------------------------------------------


def test_save_restore_round_trip():
    m = Machine()
    set_time(m, 2031, 2, 3, 4, 5, 6)
    m.write(0x42, 0x40)
    m.write(0x1F, chip.ALARM_SECONDS)
    m.write(H24 | DM_BINARY, chip.REG_B)
    m.rtc.write(INDEX, bytes((0x80 | 0x40,)))
    state = through_json(m.rtc.save())

    later = Machine(T0 + 100)                   # restored 100 s of host time later
    later.rtc.restore(state)
    assert later.read(0x40) == 0x42
    assert later.read(chip.ALARM_SECONDS) == 0x1F
    assert later.read(chip.REG_B) == H24 | DM_BINARY
    assert get_time(later) == (2031, 2, 3, 4, 6, 46)
    later.rtc.write(INDEX, bytes((0x80 | 0x40,)))
    assert changed(later.rtc.save(), flags=0, checked_ns=0) == changed(state, flags=0, checked_ns=0)


def test_restore_arms_the_timer_at_the_saved_deadline_and_counts_the_time_saved():
    m = Machine()
    enable_irq(m, UIE)
    m.clock.advance(300 * MS)
    state = through_json(m.rtc.save())
    deadline = m.timer.deadline
    assert deadline is not None

    same_time = Machine()
    same_time.clock.advance(300 * MS)
    same_time.rtc.restore(state)
    assert same_time.timer.deadline == deadline
    assert same_time.rtc.save() == state

    later = Machine(T0 + 5)                     # restored after the update was due
    later.rtc.restore(state)
    later.rtc.poll()
    assert later.irq.high and later.read(chip.REG_C) & (IRQF | UF) == IRQF | UF


def test_restore_drives_a_pending_interrupt():
    m = Machine()
    enable_irq(m, UIE)
    m.fire_timer()
    state = m.rtc.save()
    other = Machine()
    other.rtc.restore(state)
    assert other.irq.levels == [True]
    assert other.read(chip.REG_C) & IRQF and not other.irq.high


@pytest.mark.parametrize("change, message", [
    ({"ram": "AA=="}, "ram: 1 bytes of CMOS"), ({"ram": "z*" * 64}, "ram: not valid base64"),
    ({"index": 256}, "index: 256 is outside"), ({"flags": -1}, "flags: -0x1 has bits"),
    ({"flags": 0x01}, "flags: 0x1 has bits outside 0xf0"),
    ({"offset_ns": "0"}, "offset_ns: expected int"), ({"ram": None}, "ram: expected base64 bytes"),
])
def test_restore_refuses_malformed_state(change, message):
    m = Machine()
    with pytest.raises(StateError, match=message):
        RtcState.from_dict(tampered(m.rtc.save(), **change))
    data = tampered(m.rtc.save())
    del data["fields"]["ram"]
    with pytest.raises(StateError, match="missing field ram"):
        RtcState.from_dict(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.binary(min_size=1, max_size=2), st.integers(0, 2 * 10**9)),
                max_size=40))
def test_any_reachable_state_round_trips(accesses):
    m = Machine()
    for port, data, wait_ns in accesses:
        m.rtc.write(port, data)
        m.clock.advance(wait_ns)
        m.rtc.poll()
    state = m.rtc.save()
    fresh = Machine()
    fresh.clock.ns = m.clock.ns
    fresh.rtc.restore(through_json(state))
    assert fresh.rtc.save() == state
    assert fresh.timer.deadline == m.timer.deadline
    assert fresh.irq.high == m.irq.high


def test_the_fadt_century_index_is_the_chips():
    assert acpi.CMOS_RTC_CENTURY == chip.CENTURY == 0x32


def test_dates_by_arithmetic_are_the_gregorian_calendars_over_the_rtcs_range():
    """rtc.py's own date arithmetic agrees with the datetime module, day by day from year 1 to 9999."""
    import datetime

    from pyvmm.devices.legacy.rtc import _FIRST_DAY, _LAST_DAY, date_from_days, days_from_date

    epoch = datetime.date(1970, 1, 1).toordinal()
    assert (_FIRST_DAY, _LAST_DAY) == (1 - epoch, datetime.date.max.toordinal() - epoch)
    for days in range(_FIRST_DAY, _LAST_DAY + 1, 7):
        for days in (days, min(days + 3, _LAST_DAY)):
            date = datetime.date.fromordinal(epoch + days)
            assert date_from_days(days) == (date.year, date.month, date.day), days
            assert days_from_date(date.year, date.month, date.day) == days
    for year in (1, 4, 100, 1600, 1900, 2000, 2024, 2100, 9999):  # every leap-year rule, both month ends
        for month, day in ((2, 28), (3, 1), (12, 31), (1, 1)):
            assert date_from_days(days_from_date(year, month, day)) == (year, month, day)
