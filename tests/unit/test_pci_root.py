"""PCI root complex: conf1 and ECAM, BAR placement and remapping, INTx routing, snapshots
(src/pyvmm/pci/root.py, device.py)."""

import struct

import pytest

from helpers.state import through_json
from pyvmm.persist import StateError
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64 import layout
from pyvmm.bus import MmioBus, PioBus
from pyvmm.pci import BarKind, PciDevice, PciError, PciRoot
from pyvmm.pci import config as cfg
from pyvmm.pci.root import CONF1_ENABLE

ECAM = layout.PCI_ECAM_BASE
MMIO32 = (layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE)
MMIO64 = (0x1_0000_0000, 64 << 30)


class Line:
    def __init__(self, gsi):
        self.gsi, self.levels = gsi, []

    def set_level(self, high):
        self.levels.append(high)

    def trigger(self):
        self.levels += [True, False]

    @property
    def level(self):
        return bool(self.levels) and self.levels[-1]


class Machine:
    def __init__(self, mmio64=MMIO64, **kw):
        self.pio, self.mmio = PioBus(), MmioBus()
        self.lines = {}
        self.root = PciRoot(self.pio, self.mmio, ecam_base=ECAM, mmio32_window=MMIO32,
                            mmio64_window=mmio64, irq_line=self.line, **kw)

    def line(self, gsi):
        return self.lines.setdefault(gsi, Line(gsi))

    # conf1
    def conf1_address(self, slot, offset, bus=0, function=0, enable=True):
        value = (CONF1_ENABLE if enable else 0) | bus << 16 | slot << 11 | function << 8 | (offset & 0xFC)
        self.pio.write(0xCF8, struct.pack("<I", value))

    def conf1_read(self, slot, offset, size, **kw):
        self.conf1_address(slot, offset, **kw)
        return self.pio.read(0xCFC + (offset & 3), size)

    def conf1_write(self, slot, offset, data, **kw):
        self.conf1_address(slot, offset, **kw)
        self.pio.write(0xCFC + (offset & 3), data)

    # ECAM
    def ecam_read(self, slot, offset, size, bus=0, function=0):
        return self.mmio.read(ECAM + (bus << 20 | slot << 15 | function << 12 | offset), size)

    def ecam_write(self, slot, offset, data, bus=0, function=0):
        self.mmio.write(ECAM + (bus << 20 | slot << 15 | function << 12 | offset), data)

    def read32(self, slot, offset):
        return struct.unpack("<I", self.ecam_read(slot, offset, 4))[0]

    def write32(self, slot, offset, value):
        self.ecam_write(slot, offset, struct.pack("<I", value))

    def write16(self, slot, offset, value):
        self.ecam_write(slot, offset, struct.pack("<H", value))

    def ranges(self, bus=None):
        return {r.name: (r.base, r.length) for r in (bus or self.mmio).ranges}


class Recorder(PciDevice):
    """A device with a 32-bit BAR, a 64-bit BAR and an I/O BAR that logs its BAR accesses and remaps."""

    def __init__(self, **kw):
        super().__init__(0x1AF4, 0x1041, 0x020000, **kw)
        self.add_bar(0, 0x1000)
        self.add_bar(2, 0x4000, BarKind.MEM64, prefetchable=True)
        self.add_bar(4, 0x20, BarKind.IO)
        self.accesses = []
        self.remaps = []

    def bar_read(self, index, offset, size):
        self.accesses.append(("r", index, offset, size))
        return bytes([index]) * size

    def bar_write(self, index, offset, data):
        self.accesses.append(("w", index, offset, bytes(data)))

    def on_bar_remap(self, index, old, new):
        self.remaps.append((index, old, new))


@pytest.fixture
def machine():
    return Machine()


# --- host bridge, absent devices, config mechanisms ----------------------------------------


def test_host_bridge_at_slot_0(machine):
    m = machine
    assert m.read32(0, 0) == 0x0008_1B36
    assert m.read32(0, cfg.REVISION_ID) >> 8 == 0x060000
    assert m.ecam_read(0, cfg.HEADER_TYPE, 1) == b"\0"
    assert m.ecam_read(0, cfg.INTERRUPT_PIN, 1) == b"\0"
    assert m.root.host_bridge is m.root.device(0)


def test_buses_hold_conf1_and_ecam(machine):
    assert machine.ranges(machine.pio)["pci-conf1"] == (0xCF8, 8)
    assert machine.ranges()["pci-ecam"] == (ECAM, 1 << 20)


@pytest.mark.parametrize("slot, function", [(5, 0), (31, 0), (0, 1), (0, 7)])
def test_absent_functions_read_all_ones(machine, slot, function):
    assert machine.ecam_read(slot, 0, 4, function=function) == b"\xff" * 4
    assert machine.conf1_read(slot, 0, 4, function=function) == b"\xff" * 4
    assert machine.conf1_read(slot, 2, 2, function=function) == b"\xff\xff"
    machine.ecam_write(slot, cfg.COMMAND, b"\x07\x00", function=function)      # ignored


def test_buses_beyond_0_are_absent(machine):
    assert machine.conf1_read(0, 0, 4, bus=1) == b"\xff" * 4
    assert machine.mmio.read(ECAM + (1 << 20), 4) == b"\xff" * 4                # outside the window


def test_conf1_and_ecam_give_the_same_view(machine):
    m = machine
    slot = m.root.add_device(Recorder())
    for offset in range(0, 256, 4):
        assert m.conf1_read(slot, offset, 4) == m.ecam_read(slot, offset, 4), hex(offset)
    for offset in range(0, 256):
        assert m.conf1_read(slot, offset, 1) == m.ecam_read(slot, offset, 1)
    m.conf1_write(slot, cfg.INTERRUPT_LINE, b"\x2a")
    assert m.ecam_read(slot, cfg.INTERRUPT_LINE, 1) == b"\x2a"
    m.ecam_write(slot, cfg.CACHE_LINE_SIZE, b"\x10")
    assert m.conf1_read(slot, cfg.CACHE_LINE_SIZE, 1) == b"\x10"


def test_conf1_byte_and_word_offsets(machine):
    m = machine
    slot = m.root.add_device(Recorder())
    m.conf1_address(slot, 0)
    assert m.pio.read(0xCFC, 4) == bytes.fromhex("f41a4110")
    assert m.pio.read(0xCFE, 2) == bytes.fromhex("4110")                      # device ID
    assert m.pio.read(0xCFD, 1) == b"\x1a"
    assert m.pio.read(0xCFD, 2) == bytes.fromhex("1a41")                      # unaligned word inside the dword
    m.conf1_address(slot, cfg.INTERRUPT_LINE)
    m.pio.write(0xCFD, b"\x02")                                                 # interrupt pin: read-only
    m.pio.write(0xCFC, b"\x0b")
    assert m.pio.read(0xCFC, 4)[:2] == b"\x0b\x01"


def test_conf1_address_register(machine):
    m = machine
    m.pio.write(0xCF8, struct.pack("<I", 0xFFFFFFFF))
    assert m.pio.read(0xCF8, 4) == struct.pack("<I", 0x80FFFFFC)              # reserved bits read 0
    m.pio.write(0xCF8, struct.pack("<I", 0x80000000))
    assert m.pio.read(0xCF8, 4) == struct.pack("<I", 0x80000000)
    # Linux's conf1 probe: a byte write to 0xCFB must not change the address register.
    m.pio.write(0xCFB, b"\x01")
    m.pio.write(0xCF8, b"\x00\x00")
    assert m.pio.read(0xCF8, 4) == struct.pack("<I", 0x80000000)
    assert m.pio.read(0xCF8, 1) == b"\xff" and m.pio.read(0xCFA, 2) == b"\xff\xff"
    assert m.pio.read(0xCFC, 4) == bytes.fromhex("361b0800")                  # 00:00.0 vendor/device


def test_conf1_enable_bit(machine):
    m = machine
    m.conf1_address(0, 0, enable=False)
    assert m.pio.read(0xCFC, 4) == b"\xff" * 4
    m.conf1_address(0, cfg.INTERRUPT_LINE, enable=False)
    m.pio.write(0xCFC, b"\x05")
    assert m.conf1_read(0, cfg.INTERRUPT_LINE, 1) == b"\0"


def test_conf1_access_past_the_dword_reads_all_ones(machine):
    machine.conf1_address(0, 0)
    assert machine.pio.read(0xCFE, 4) == b"\xff" * 4


# --- slots and BAR placement ------------------------------------------------------------------


def test_slots_fill_from_1(machine):
    m = machine
    slots = [m.root.add_device(PciDevice(0x1AF4, 0x1000 + i, 0xFF0000)) for i in range(31)]
    assert slots == list(range(1, 32))
    with pytest.raises(PciError, match="no free PCI slot"):
        m.root.add_device(PciDevice(1, 1, 0))


def test_slot_errors(machine):
    m = machine
    m.root.add_device(PciDevice(1, 1, 0), slot=7)
    with pytest.raises(PciError):
        m.root.add_device(PciDevice(1, 2, 0), slot=7)
    for slot in (0, 32, -1):
        with pytest.raises(PciError):
            m.root.add_device(PciDevice(1, 2, 0), slot=slot)
    d = PciDevice(1, 3, 0)
    m.root.add_device(d, name="third")
    assert d.name == "third"
    with pytest.raises(PciError):
        m.root.add_device(d)                                     # already plugged in
    with pytest.raises(PciError):
        d.add_bar(0, 0x1000)                                     # too late to declare


def test_bars_placed_in_their_windows_with_decode_on(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d, name="rec")
    assert d.config.command & (cfg.COMMAND_IO | cfg.COMMAND_MEMORY) == cfg.COMMAND_IO | cfg.COMMAND_MEMORY
    assert not d.config.command & cfg.COMMAND_MASTER
    b0, b2, b4 = (d.bar_address(i) for i in (0, 2, 4))
    assert MMIO32[0] <= b0 < MMIO32[0] + MMIO32[1] and b0 % 0x1000 == 0
    assert b2 == MMIO64[0]
    assert layout.PCI_IO_START <= b4 < 0x10000 and b4 % 0x20 == 0
    assert m.read32(slot, cfg.BAR0) == b0
    assert m.read32(slot, cfg.BAR0 + 8) == (b2 & 0xFFFFFFFF) | 0xC and m.read32(slot, cfg.BAR0 + 12) == b2 >> 32
    assert m.read32(slot, cfg.BAR0 + 16) == b4 | 1
    assert m.ranges()["rec-bar0"] == (b0, 0x1000) and m.ranges()["rec-bar2"] == (b2, 0x4000)
    assert m.ranges(m.pio)["rec-bar4"] == (b4, 0x20)
    assert sorted(d.remaps) == [(0, None, b0), (2, None, b2), (4, None, b4)]
    # accesses land at offsets within the BAR
    assert m.mmio.read(b0 + 0x10, 4) == b"\0" * 4
    m.pio.write(b4 + 3, b"\x7f")
    m.mmio.write(b2 + 0x3FF8, b"\x01" * 8)
    assert d.accesses == [("r", 0, 0x10, 4), ("w", 4, 3, b"\x7f"), ("w", 2, 0x3FF8, b"\x01" * 8)]


def test_64bit_bars_use_the_32bit_window_without_a_64bit_one():
    m = Machine(mmio64=None)
    d = Recorder()
    m.root.add_device(d)
    assert MMIO32[0] <= d.bar_address(2) < MMIO32[0] + MMIO32[1]


def test_window_exhaustion_is_an_error_and_leaves_the_root_usable():
    m = Machine(mmio64=None)
    big = PciDevice(1, 1, 0)
    big.add_bar(0, MMIO32[1] * 2)
    with pytest.raises(PciError, match="no room"):
        m.root.add_device(big)
    d = Recorder()
    m.root.add_device(d)
    assert d.bar_address(0) is not None


# --- BAR sizing and moves by the guest ----------------------------------------------------------


def test_linux_style_sizing_unmaps_and_restores(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d, name="rec")
    b0 = d.bar_address(0)
    command = struct.unpack("<H", m.ecam_read(slot, cfg.COMMAND, 2))[0]
    m.write16(slot, cfg.COMMAND, command & ~(cfg.COMMAND_IO | cfg.COMMAND_MEMORY))
    assert d.bar_address(0) is d.bar_address(2) is d.bar_address(4) is None
    assert "rec-bar0" not in m.ranges() and "rec-bar4" not in m.ranges(m.pio)
    m.write32(slot, cfg.BAR0, 0xFFFFFFFF)
    assert m.read32(slot, cfg.BAR0) == 0xFFFFF000
    m.write32(slot, cfg.BAR0, b0)
    m.write16(slot, cfg.COMMAND, command)
    assert d.bar_address(0) == b0 and m.ranges()["rec-bar0"] == (b0, 0x1000)
    assert d.remaps[-6:-3] == [(0, b0, None), (2, MMIO64[0], None), (4, d.bar_address(4), None)]


def test_sizing_with_decode_on_never_maps_the_all_ones_address(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d)
    old = d.bar_address(0)
    m.write32(slot, cfg.BAR0, 0xFFFFFFFF)                  # decode still on
    assert d.bar_address(0) is None and d.remaps[-1] == (0, old, None)
    m.write32(slot, cfg.BAR0 + 16, 0xFFFFFFFF)
    assert d.bar_address(4) is None
    m.write32(slot, cfg.BAR0 + 8, 0xFFFFFFFF)
    m.write32(slot, cfg.BAR0 + 12, 0xFFFFFFFF)
    assert d.bar_address(2) is None


def test_guest_moves_a_32bit_bar(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d, name="rec")
    old = d.bar_address(0)
    new = 0xC800_0000
    m.write32(slot, cfg.BAR0, new)
    assert d.bar_address(0) == new and m.ranges()["rec-bar0"] == (new, 0x1000)
    assert d.remaps[-1] == (0, old, new)
    assert m.mmio.find(old) is None
    assert m.mmio.read(new + 8, 1) == b"\0"
    assert d.accesses[-1] == ("r", 0, 8, 1)


def test_guest_moves_a_64bit_bar_half_by_half(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d, name="rec")
    old = d.bar_address(2)
    m.write32(slot, cfg.BAR0 + 8, 0x8000_0000)            # low half first: 0x1_8000_0000
    assert d.bar_address(2) == 0x1_8000_0000
    m.write32(slot, cfg.BAR0 + 12, 0x20)                  # then the high half
    assert d.bar_address(2) == 0x20_8000_0000
    assert [r for r in d.remaps if r[0] == 2][-2:] == [(2, old, 0x1_8000_0000), (2, 0x1_8000_0000, 0x20_8000_0000)]
    assert m.ranges()["rec-bar2"] == (0x20_8000_0000, 0x4000)


def test_io_bar_moves_and_io_decode_alone(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d, name="rec")
    m.write32(slot, cfg.BAR0 + 16, 0xD000)
    assert d.bar_address(4) == 0xD000 and m.ranges(m.pio)["rec-bar4"] == (0xD000, 0x20)
    m.write16(slot, cfg.COMMAND, cfg.COMMAND_MEMORY)      # I/O decode off, memory on
    assert d.bar_address(4) is None and d.bar_address(0) is not None
    m.write32(slot, cfg.BAR0 + 16, 0x1_0000)
    m.write16(slot, cfg.COMMAND, cfg.COMMAND_MEMORY | cfg.COMMAND_IO)
    assert d.bar_address(4) is None                       # outside port space
    m.write32(slot, cfg.BAR0 + 16, 0xFFE0)
    assert d.bar_address(4) == 0xFFE0                     # the last 32 ports are fine


def test_bar_at_zero_is_unmapped(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d)
    m.write32(slot, cfg.BAR0, 0)
    assert d.bar_address(0) is None


def test_bar_moved_onto_another_device_stays_unmapped_until_moved_away(machine, caplog):
    m = machine
    a, b = Recorder(name="a"), Recorder(name="b")
    m.root.add_device(a)
    slot_b = m.root.add_device(b)
    target = a.bar_address(0)
    m.write32(slot_b, cfg.BAR0, target)
    assert b.bar_address(0) is None and "BAR 0 left unmapped" in caplog.text
    assert m.mmio.find(target).name == "a-bar0"
    m.write32(slot_b, cfg.BAR0, 0xCF00_0000)
    assert b.bar_address(0) == 0xCF00_0000


def test_two_bars_of_a_device_can_swap(machine):
    m = machine
    d = PciDevice(1, 1, 0)
    d.add_bar(0, 0x1000)
    d.add_bar(1, 0x1000)
    slot = m.root.add_device(d, name="swap")
    a, b = d.bar_address(0), d.bar_address(1)
    m.write16(slot, cfg.COMMAND, 0)
    m.write32(slot, cfg.BAR0, b)
    m.write32(slot, cfg.BAR0 + 4, a)
    m.write16(slot, cfg.COMMAND, cfg.COMMAND_MEMORY)
    assert (d.bar_address(0), d.bar_address(1)) == (b, a)


def test_bar_remap_listeners(machine):
    m = machine
    d = Recorder()
    seen = []
    d.bar_remap_listeners.append(lambda i, old, new: seen.append((i, old, new)))
    slot = m.root.add_device(d)
    m.write32(slot, cfg.BAR0, 0xC900_0000)
    assert seen == d.remaps


# --- INTx ---------------------------------------------------------------------------------------


def test_intx_swizzle_and_interrupt_line(machine):
    m = machine
    assert [m.root.intx_gsi(slot, 1) for slot in range(1, 10)] == [17, 18, 19, 20, 21, 22, 23, 16, 17]
    assert [m.root.intx_gsi(3, pin) for pin in (1, 2, 3, 4)] == [19, 20, 21, 22]
    routes = m.root.intx_routes()
    assert len(routes) == 31 * 4 and routes[0] == (1, 0, 17) and routes[-1] == (31, 3, 18)
    d = Recorder(interrupt_pin=cfg.INTB)
    slot = m.root.add_device(d, slot=4)
    assert m.ecam_read(slot, cfg.INTERRUPT_LINE, 2) == bytes([m.root.intx_gsi(4, 2), 2])


def test_intx_drives_level_and_status(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d)
    line = m.lines[m.root.intx_gsi(slot, 1)]
    d.set_intx(True)
    assert line.level and m.read32(slot, cfg.COMMAND) >> 16 & cfg.STATUS_INTERRUPT
    d.set_intx(False)
    assert not line.level and not m.read32(slot, cfg.COMMAND) >> 16 & cfg.STATUS_INTERRUPT


def test_intx_disable_bit_gates_the_line_not_the_status(machine):
    m = machine
    d = Recorder()
    slot = m.root.add_device(d)
    line = m.lines[m.root.intx_gsi(slot, 1)]
    command = d.config.command
    m.write16(slot, cfg.COMMAND, command | cfg.COMMAND_INTX_DISABLE)
    d.set_intx(True)
    assert not line.level and d.config.status & cfg.STATUS_INTERRUPT
    m.write16(slot, cfg.COMMAND, command)                 # re-enabled while asserted: the line rises
    assert line.level
    m.write16(slot, cfg.COMMAND, command | cfg.COMMAND_INTX_DISABLE)
    assert not line.level


def test_shared_gsi_is_a_wired_or(machine):
    m = machine
    a, b = Recorder(name="a"), Recorder(name="b")
    m.root.add_device(a, slot=1)
    m.root.add_device(b, slot=9)                          # same GSI as slot 1 (eight GSIs)
    gsi = m.root.intx_gsi(1, 1)
    assert gsi == m.root.intx_gsi(9, 1)
    line = m.lines[gsi]
    a.set_intx(True)
    b.set_intx(True)
    a.set_intx(False)
    assert line.level                                     # b still holds it
    b.set_intx(False)
    assert not line.level
    assert line.levels == [True, False]                   # one rising and one falling edge


def test_devices_without_a_pin_get_no_line(machine):
    m = machine
    d = PciDevice(1, 1, 0, interrupt_pin=0)
    m.root.add_device(d)
    d.set_intx(True)                                      # goes nowhere, does not fail
    assert m.lines == {}


def test_custom_gsis():
    m = Machine(intx_gsis=(20, 21))
    assert [m.root.intx_gsi(s, 1) for s in (1, 2, 3)] == [21, 20, 21]
    with pytest.raises(PciError):
        Machine(intx_gsis=())


# --- snapshots ------------------------------------------------------------------------------------


def test_save_restore_moves_bars_and_lines():
    m = Machine()
    d = Recorder()
    slot = m.root.add_device(d, name="rec")
    m.write32(slot, cfg.BAR0, 0xCA00_0000)
    m.pio.write(0xCF8, struct.pack("<I", 0x80000810))
    d.set_intx(True)
    state = through_json(m.root.save())

    n = Machine()
    e = Recorder()
    n.root.add_device(e, name="rec")
    n.root.restore(state)
    assert n.root.save() == state
    assert e.bar_address(0) == 0xCA00_0000 and n.ranges()["rec-bar0"] == (0xCA00_0000, 0x1000)
    assert n.pio.read(0xCF8, 4) == struct.pack("<I", 0x80000810)
    assert n.lines[n.root.intx_gsi(slot, 1)].level
    assert e.remaps[-1][0] in (0, 2, 4)
    for offset in range(0, 256, 4):
        assert n.read32(slot, offset) == m.read32(slot, offset)


def test_restore_needs_the_same_slots():
    m = Machine()
    m.root.add_device(Recorder())
    with pytest.raises(StateError, match=r"devices: in slots \[0, 1\], this root has \[0\]"):
        Machine().root.restore(m.root.save())


def test_close_takes_everything_off_the_buses():
    m = Machine()
    m.root.add_device(Recorder())
    m.root.close()
    assert m.mmio.ranges == () and m.pio.ranges == ()


# --- random guest writes --------------------------------------------------------------------------


accesses = st.lists(
    st.tuples(
        st.sampled_from(["ecam", "conf1", "conf1-address"]),
        st.integers(0, 3),                                  # slot (0 = host bridge, 1-2 devices, 3 absent)
        st.integers(0, 0x1FF),                              # offset (ECAM can go past 0xFF)
        st.sampled_from([1, 2, 4]),
        st.integers(0, 0xFFFFFFFF),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(accesses)
def test_random_config_writes_never_raise(ops):
    m = Machine()
    a, b = Recorder(name="a"), Recorder(name="b", interrupt_pin=cfg.INTC)
    m.root.add_device(a)
    m.root.add_device(b)
    ids = {slot: m.read32(slot, 0) for slot in (0, 1, 2)}
    for kind, slot, offset, size, value in ops:
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        if kind == "ecam":
            offset -= offset % size
            m.ecam_write(slot, offset, data)
            m.ecam_read(slot, offset, size)
        elif kind == "conf1":
            m.conf1_address(slot, offset)
            port = 0xCFC + (offset & 3)
            m.pio.write(port, data)
            m.pio.read(port, size)
        else:
            m.pio.write(0xCF8 + (offset & 7) - (offset & 7) % size, data)
    # identity is untouched and every mapped BAR is where its register says
    for slot, dev_id in ids.items():
        assert m.read32(slot, 0) == dev_id
    for dev in (a, b):
        for index, bar in dev.config.bars.items():
            address = dev.bar_address(index)
            if address is not None:
                assert address == dev.config.bar_register_value(index)
                bus = m.pio if bar.is_io else m.mmio
                assert bus.find(address).device.device is dev
        assert dev.config.get(cfg.BAR0 + 16, 4) & 1 == 1          # the I/O BAR keeps its space bit
