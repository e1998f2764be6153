"""Bus: range registration, lookup, unclaimed accesses (src/pyvmm/bus/bus.py)."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.bus import Bus, BusConflict, MmioBus, PioBus

BUS_LOGGER = "pyvmm.bus.bus"


class Recorder:
    """A device that records every access and answers reads with a per-device pattern."""

    def __init__(self, tag: int = 0xA5):
        self.tag = tag
        self.reads = []
        self.writes = []

    def read(self, offset, size):
        self.reads.append((offset, size))
        return bytes([self.tag]) * size

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


def three_device_bus():
    bus = PioBus()
    a, b, c = Recorder(1), Recorder(2), Recorder(3)
    bus.register(0x60, 5, a, "a")      # 0x60..0x64
    bus.register(0x3F8, 8, b, "b")     # 0x3f8..0x3ff
    bus.register(0x400, 1, c, "c")     # 0x400, adjacent to b
    return bus, a, b, c


# --- registration and lookup -------------------------------------------------------------


def test_find_resolves_each_range_to_its_device():
    bus, a, b, c = three_device_bus()
    assert bus.find(0x62).device is a
    assert bus.find(0x3FA).device is b
    assert bus.find(0x400).device is c
    assert bus.find(0x400).name == "c"


@pytest.mark.parametrize(
    "address, expected",
    [
        (0x5F, None),    # one below a
        (0x60, "a"),     # first address of a
        (0x64, "a"),     # last address of a
        (0x65, None),    # one past a
        (0x3F7, None),   # one below b
        (0x3F8, "b"),
        (0x3FF, "b"),    # last of b ...
        (0x400, "c"),    # ... and c starts right after it
        (0x401, None),   # one past c
        (0x0, None),
        (0xFFFF, None),
    ],
)
def test_range_boundaries(address, expected):
    bus, *_ = three_device_bus()
    found = bus.find(address)
    assert (found.name if found else None) == expected


def test_ranges_are_sorted_by_base_regardless_of_registration_order():
    bus = PioBus()
    for base in (0x300, 0x10, 0x200, 0x20):
        bus.register(base, 4, Recorder(), f"d{base:x}")
    assert [r.base for r in bus.ranges] == [0x10, 0x20, 0x200, 0x300]


def test_register_returns_range_with_end_and_default_name():
    bus = PioBus()
    r = bus.register(0x70, 2, Recorder())
    assert (r.base, r.length, r.end) == (0x70, 2, 0x72)
    assert r.name == "Recorder"


@pytest.mark.parametrize(
    "base, length",
    [
        (0x0FE, 4),    # partial overlap at the start of the existing range (0x100..0x10f)
        (0x10C, 8),    # partial overlap at its end
        (0x104, 2),    # contained in it
        (0x0F0, 0x40),  # containing it
        (0x100, 0x10),  # identical
        (0x10F, 1),    # just its last address
        (0x0F0, 0x11),  # reaching just its first address
    ],
)
def test_overlapping_registration_rejected_naming_both(base, length):
    bus = PioBus()
    existing = Recorder()
    bus.register(0x100, 0x10, existing, "uart")
    with pytest.raises(BusConflict) as info:
        bus.register(base, length, Recorder(), "intruder")
    message = str(info.value)
    assert "uart" in message and "intruder" in message
    # the failed registration left the bus as it was
    assert [(r.base, r.length, r.name) for r in bus.ranges] == [(0x100, 0x10, "uart")]
    assert bus.find(0x0FF) is None and bus.find(0x110) is None


def test_adjacent_ranges_on_both_sides_are_accepted():
    bus = PioBus()
    bus.register(0x100, 0x10, Recorder(), "mid")
    bus.register(0x0F0, 0x10, Recorder(), "below")   # ends at 0xff
    bus.register(0x110, 0x10, Recorder(), "above")   # starts at 0x110
    assert [r.name for r in bus.ranges] == ["below", "mid", "above"]


@pytest.mark.parametrize(
    "base, length",
    [
        (0x10, 0),          # empty
        (0x10, -4),         # negative length
        (-1, 2),            # below the bus
        (0xFFFF, 2),        # runs past the 64 KiB port space
        (0x10000, 1),       # starts past it
    ],
)
def test_empty_or_out_of_bus_ranges_rejected(base, length):
    bus = PioBus()
    with pytest.raises(BusConflict):
        bus.register(base, length, Recorder(), "bad")
    assert bus.ranges == ()


def test_range_ending_exactly_at_bus_limit_is_accepted():
    bus = PioBus()
    bus.register(0xFFFF, 1, Recorder(), "last")
    assert bus.find(0xFFFF).name == "last"
    mmio = MmioBus()
    mmio.register((1 << 64) - 0x1000, 0x1000, Recorder(), "top")
    assert mmio.find((1 << 64) - 1).name == "top"
    with pytest.raises(BusConflict):
        mmio.register((1 << 64) - 0x1000, 0x1001, Recorder(), "too-far")


def test_unregister_frees_the_range_and_returns_the_device():
    bus, a, b, c = three_device_bus()
    assert bus.unregister(0x3F8) is b
    assert bus.find(0x3F8) is None
    assert bus.find(0x3FF) is None
    assert bus.find(0x400).device is c      # neighbours unaffected
    assert bus.find(0x60).device is a
    # the space can be claimed again, by something of a different shape
    d = Recorder()
    bus.register(0x3F0, 0x10, d, "d")
    assert bus.find(0x3F8).device is d


def test_unregister_unknown_base_raises_keyerror():
    bus, *_ = three_device_bus()
    with pytest.raises(KeyError):
        bus.unregister(0x3F9)   # inside b, but not its base
    assert bus.find(0x3F9) is not None


# --- accesses ----------------------------------------------------------------------------


def test_device_sees_offsets_relative_to_its_base():
    bus, a, b, c = three_device_bus()
    assert bus.read(0x3FB, 2) == b"\x02\x02"
    bus.write(0x3F8, b"x")
    bus.write(0x3FF, b"yz")
    bus.write(0x60, b"k")
    assert b.reads == [(3, 2)]
    assert b.writes == [(0, b"x"), (7, b"yz")]
    assert a.writes == [(0, b"k")]
    assert c.reads == [] and c.writes == []


def test_mmio_offsets_relative_to_large_base():
    bus = MmioBus()
    dev = Recorder(7)
    bus.register(0xFEC00000, 0x1000, dev, "ioapic")
    assert bus.read(0xFEC00010, 4) == b"\x07" * 4
    bus.write(0xFEC00FFC, b"\x01\x02\x03\x04")
    assert dev.reads == [(0x10, 4)]
    assert dev.writes == [(0xFFC, b"\x01\x02\x03\x04")]


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_unclaimed_read_returns_all_ones(size):
    bus, a, b, c = three_device_bus()
    assert bus.read(0x1234, size) == b"\xff" * size
    assert all(not d.reads for d in (a, b, c))


def test_unclaimed_write_is_dropped():
    bus, a, b, c = three_device_bus()
    bus.write(0x65, b"\x00")   # one past a
    bus.write(0x3F7, b"\x00")  # one below b
    assert all(not d.writes for d in (a, b, c))
    assert bus.unclaimed_accesses == 2


def _bus_records(caplog):
    return [r for r in caplog.records if r.name == BUS_LOGGER]


def test_unclaimed_accesses_logged_once_per_address(caplog):
    caplog.set_level(logging.DEBUG, logger=BUS_LOGGER)
    bus, *_ = three_device_bus()
    bus.read(0x80, 1)
    bus.read(0x80, 1)
    assert len(_bus_records(caplog)) == 1
    assert "0x80" in _bus_records(caplog)[0].getMessage()
    bus.write(0x80, b"\x01")          # same address, other direction: still quiet
    assert len(_bus_records(caplog)) == 1
    bus.write(0x81, b"\x01")          # a new address: one more record
    assert len(_bus_records(caplog)) == 2
    assert "0x81" in _bus_records(caplog)[1].getMessage()
    bus.read(0x81, 2)
    assert len(_bus_records(caplog)) == 2
    assert bus.unclaimed_accesses == 5


def test_claimed_accesses_are_not_logged_as_unclaimed(caplog):
    caplog.set_level(logging.DEBUG, logger=BUS_LOGGER)
    bus, *_ = three_device_bus()
    bus.read(0x60, 1)
    bus.write(0x3F8, b"a")
    assert _bus_records(caplog) == []
    assert bus.unclaimed_accesses == 0


def test_log_once_is_per_bus(caplog):
    caplog.set_level(logging.DEBUG, logger=BUS_LOGGER)
    first, second = PioBus(), PioBus()
    first.read(0x80, 1)
    second.read(0x80, 1)   # another bus has not warned about 0x80 yet
    first.read(0x80, 1)
    second.read(0x80, 1)
    assert len(_bus_records(caplog)) == 2


# --- property tests ----------------------------------------------------------------------

SPACE = 256


@st.composite
def disjoint_ranges(draw):
    """A list of non-overlapping (base, length) pairs inside [0, SPACE)."""
    cuts = sorted(draw(st.sets(st.integers(0, SPACE), min_size=0, max_size=24)))
    pairs = list(zip(cuts, cuts[1:]))
    keep = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    chosen = [(lo, hi - lo) for (lo, hi), k in zip(pairs, keep) if k]
    return draw(st.permutations(chosen))


@settings(max_examples=200, deadline=None)
@given(disjoint_ranges())
def test_every_address_resolves_like_a_brute_force_model(ranges):
    bus = Bus(SPACE)
    model = [None] * SPACE
    for i, (base, length) in enumerate(ranges):
        bus.register(base, length, Recorder(i), f"dev{i}")
        for addr in range(base, base + length):
            model[addr] = f"dev{i}"
    for addr in range(SPACE):
        found = bus.find(addr)
        assert (found.name if found else None) == model[addr], hex(addr)
        expected_read = b"\xff" if model[addr] is None else bytes([int(model[addr][3:])])
        assert bus.read(addr, 1) == expected_read


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-4, SPACE + 4), st.integers(-2, 40)), max_size=30))
def test_random_register_attempts_never_leave_overlaps(attempts):
    bus = Bus(SPACE)
    accepted = []
    for i, (base, length) in enumerate(attempts):
        valid = length > 0 and base >= 0 and base + length <= SPACE
        clashes = any(base < b + n and b < base + length for b, n in accepted)
        try:
            bus.register(base, length, Recorder(), f"d{i}")
        except BusConflict:
            assert not valid or clashes
        else:
            assert valid and not clashes
            accepted.append((base, length))
    ranges = bus.ranges
    assert sorted((r.base, r.length) for r in ranges) == sorted(accepted)
    assert [r.base for r in ranges] == sorted(r.base for r in ranges)
    for x, y in zip(ranges, ranges[1:]):
        assert x.end <= y.base


# --- per-address handlers (writer/reader: the KVM run loop's path) ---------------------------


@pytest.mark.parametrize("bus_class", [PioBus, MmioBus])
def test_handlers_reach_the_device_at_its_offset_like_read_and_write(bus_class):
    bus = bus_class()
    device = Recorder(0x5A)
    bus.register(0x60, 8, device, "d")
    bus.writer(0x63)(b"\x01\x02")
    assert bus.reader(0x65)(2) == b"\x5a\x5a"
    assert device.writes == [(3, b"\x01\x02")] and device.reads == [(5, 2)]
    # made once per address, then found in the tables the hot path looks up first
    assert bus.writers[0x63] is bus.writer(0x63) and bus.readers[0x65] is bus.reader(0x65)


def test_unclaimed_handlers_answer_all_ones_count_and_log_once(caplog):
    bus = MmioBus()
    with caplog.at_level(logging.INFO, logger=BUS_LOGGER):
        assert bus.reader(0xD000_0000)(4) == b"\xff" * 4
        bus.writer(0xD000_0000)(b"\x00" * 4)
        bus.writer(0xD000_0000)(b"\x00" * 4)
    assert bus.unclaimed_accesses == 3
    assert len([r for r in caplog.records if "0xd0000000" in r.getMessage()]) == 1


@pytest.mark.parametrize("bus_class", [PioBus, MmioBus])
def test_handlers_follow_registration_and_unregistration(bus_class):
    bus = bus_class()
    bus.writer(0x70)(b"\x00")  # unclaimed: remembered as such ...
    first, second = Recorder(1), Recorder(2)
    bus.register(0x70, 2, first)  # ... until a device arrives there
    bus.writer(0x71)(b"\x01")
    assert bus.reader(0x70)(1) == b"\x01"
    bus.unregister(0x70)
    bus.register(0x6F, 4, second)
    bus.writer(0x71)(b"\x02")
    assert bus.reader(0x70)(1) == b"\x02"
    assert first.writes == [(1, b"\x01")] and second.writes == [(2, b"\x02")]
    bus.unregister(0x6F)
    assert bus.reader(0x70)(1) == b"\xff"


def test_handler_tables_stay_bounded():
    from pyvmm.bus.bus import CACHED_ADDRESSES

    bus = MmioBus()
    for address in range(CACHED_ADDRESSES + 10):
        assert bus.reader(address)(1) == b"\xff"
    assert 0 < len(bus.readers) <= CACHED_ADDRESSES
