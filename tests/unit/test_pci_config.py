"""PCI configuration space: masks, BAR sizing, capabilities, snapshots (src/pyvmm/pci/config.py)."""

import struct

import pytest

from helpers.state import through_json
from pyvmm.pci.config import PciConfigState
from pyvmm.persist import StateError

from pyvmm.pci import BarKind, PciConfigSpace, PciError
from pyvmm.pci import config as cfg


def space(**kw) -> PciConfigSpace:
    return PciConfigSpace(0x1AF4, 0x1041, 0x020000, revision=1, subsystem_id=0x1100, interrupt_pin=cfg.INTA, **kw)


def u16(s, offset):
    return struct.unpack("<H", s.read(offset, 2))[0]


def u32(s, offset):
    return struct.unpack("<I", s.read(offset, 4))[0]


def w32(s, offset, value):
    s.write(offset, struct.pack("<I", value))


def test_identity_registers_are_read_only():
    s = space()
    assert s.read(0, 4) == bytes.fromhex("f41a4110")
    assert s.read(cfg.REVISION_ID, 4) == bytes([1, 0, 0, 2])          # revision, prog-if, sub, base class
    assert u16(s, cfg.SUBSYSTEM_VENDOR_ID) == 0x1AF4 and u16(s, cfg.SUBSYSTEM_ID) == 0x1100
    assert s.read(cfg.INTERRUPT_PIN, 1) == b"\x01"
    before = s.read(0, 256)
    for offset in (0, 8, 0x0E, 0x2C, 0x30, 0x34, 0x3C, 0x3E, 0x80, 0xFC):
        s.write(offset, b"\xff\xff")
    after = s.read(0, 256)
    changed = [i for i in range(256) if before[i] != after[i]]
    assert changed == [cfg.INTERRUPT_LINE]                           # 0x3C is the OS's scratch byte


def test_command_register_mask():
    s = space()
    s.write(cfg.COMMAND, b"\xff\xff")
    assert s.command == cfg.COMMAND_WRITABLE == 0x0547
    s.write(cfg.COMMAND, b"\x00\x00")
    assert s.command == 0


def test_status_error_bits_are_write_one_to_clear():
    s = space()
    s.put(cfg.STATUS, 2, 0xF900 | cfg.STATUS_INTERRUPT | cfg.STATUS_CAP_LIST)
    s.write(cfg.STATUS, struct.pack("<H", 0x0100 | 0x8000 | cfg.STATUS_INTERRUPT | cfg.STATUS_CAP_LIST))
    assert s.status == 0x7800 | cfg.STATUS_INTERRUPT | cfg.STATUS_CAP_LIST   # only the W1C bits written as 1 cleared
    s.write(cfg.STATUS, b"\x00\x00")
    assert s.status == 0x7800 | cfg.STATUS_INTERRUPT | cfg.STATUS_CAP_LIST   # writing 0 changes nothing
    # A dword write to COMMAND also hits STATUS: the usual read-modify-write keeps the error bits
    # only if software writes them back as 0.
    w32(s, cfg.COMMAND, cfg.COMMAND_MEMORY | 0x7800 << 16)
    assert s.status == cfg.STATUS_INTERRUPT | cfg.STATUS_CAP_LIST and s.command == cfg.COMMAND_MEMORY


def test_memory32_bar_sizing():
    s = space()
    s.add_bar(0, 0x4000)
    assert u32(s, cfg.BAR0) == 0
    w32(s, cfg.BAR0, 0xFFFFFFFF)
    assert u32(s, cfg.BAR0) == 0xFFFFC000                             # ~(size - 1), type bits 0
    w32(s, cfg.BAR0, 0xC0004567)
    assert u32(s, cfg.BAR0) == 0xC0004000                             # low bits hardwired
    assert s.bar_register_value(0) == 0xC0004000


def test_prefetchable_memory32_bar_keeps_its_flag():
    s = space()
    s.add_bar(2, 0x1000, prefetchable=True)
    w32(s, cfg.BAR0 + 8, 0xFFFFFFFF)
    assert u32(s, cfg.BAR0 + 8) == 0xFFFFF008
    w32(s, cfg.BAR0 + 8, 0)
    assert u32(s, cfg.BAR0 + 8) == 0x8


def test_memory64_bar_sizing_both_halves():
    s = space()
    s.add_bar(4, 0x2_0000_0000, BarKind.MEM64, prefetchable=True)     # 8 GiB: the size reaches the high dword
    low, high = cfg.BAR0 + 16, cfg.BAR0 + 20
    assert u32(s, low) == 0xC                                         # 64-bit, prefetchable
    w32(s, low, 0xFFFFFFFF)
    w32(s, high, 0xFFFFFFFF)
    assert u32(s, low) == 0x0000000C
    assert u32(s, high) == 0xFFFFFFFE
    size_mask = (u32(s, high) << 32) | (u32(s, low) & ~0xF)
    assert (~size_mask + 1) & ((1 << 64) - 1) == 0x2_0000_0000
    w32(s, low, 0)
    w32(s, high, 0x10)
    assert s.bar_register_value(4) == 0x10_0000_0000


def test_small_memory64_bar():
    s = space()
    s.add_bar(0, 0x4000, BarKind.MEM64)
    w32(s, cfg.BAR0, 0xFFFFFFFF)
    w32(s, cfg.BAR0 + 4, 0xFFFFFFFF)
    assert (u32(s, cfg.BAR0), u32(s, cfg.BAR0 + 4)) == (0xFFFFC004, 0xFFFFFFFF)


def test_io_bar_sizing():
    s = space()
    s.add_bar(1, 0x20, BarKind.IO)
    assert u32(s, cfg.BAR0 + 4) == 1
    w32(s, cfg.BAR0 + 4, 0xFFFFFFFF)
    assert u32(s, cfg.BAR0 + 4) == 0xFFFFFFE1
    w32(s, cfg.BAR0 + 4, 0xC047)
    assert u32(s, cfg.BAR0 + 4) == 0xC041 and s.bar_register_value(1) == 0xC040


def test_unused_bars_and_rom_read_zero_after_all_ones():
    s = space()
    s.add_bar(0, 0x1000)
    for index in range(1, 6):
        w32(s, cfg.BAR0 + 4 * index, 0xFFFFFFFF)
        assert u32(s, cfg.BAR0 + 4 * index) == 0
    w32(s, cfg.EXPANSION_ROM, 0xFFFFFFFF)
    assert u32(s, cfg.EXPANSION_ROM) == 0                             # no ROM


@pytest.mark.parametrize("args", [
    (6, 0x1000, BarKind.MEM32),
    (5, 0x1000, BarKind.MEM64),          # needs two registers
    (0, 0x1800, BarKind.MEM32),          # not a power of two
    (0, 8, BarKind.MEM32),               # below 16 bytes
    (0, 2, BarKind.IO),
    (0, 512, BarKind.IO),                # I/O BARs are at most 256 bytes
    (0, 1 << 32, BarKind.MEM32),
])
def test_bad_bars_are_refused(args):
    with pytest.raises(PciError):
        space().add_bar(*args)


def test_bars_cannot_share_registers():
    s = space()
    s.add_bar(0, 0x1000, BarKind.MEM64)
    with pytest.raises(PciError):
        s.add_bar(1, 0x1000)
    with pytest.raises(PciError):
        space().add_bar(0, 0x10, BarKind.IO, prefetchable=True)


def test_capability_list():
    s = space()
    assert not s.status & cfg.STATUS_CAP_LIST and s.read(cfg.CAPABILITIES_POINTER, 1) == b"\0"
    first = s.add_capability(cfg.CAP_ID_VENDOR, bytes([5, 0xAA, 0xBB]))      # 5 bytes: next one dword-aligned
    second = s.add_capability(0x11, bytes(10), writable=bytes([0, 0xC0] + [0] * 8))
    assert (first, second) == (0x40, 0x48)
    assert s.status & cfg.STATUS_CAP_LIST
    assert s.read(cfg.CAPABILITIES_POINTER, 1) == b"\x40"
    assert s.read(0x40, 5) == bytes([0x09, 0x48, 5, 0xAA, 0xBB])
    assert s.read(0x48, 2) == bytes([0x11, 0x00])                      # end of list
    assert s.capabilities == [(0x09, 0x40), (0x11, 0x48)]
    s.write(0x40, b"\xff" * 5)                                         # read-only capability
    assert s.read(0x40, 5) == bytes([0x09, 0x48, 5, 0xAA, 0xBB])
    s.write(0x4A, b"\xff\xff")
    assert s.read(0x4A, 2) == b"\x00\xc0"


def test_capabilities_must_fit_below_256():
    s = space()
    s.add_capability(0x09, bytes(180))
    with pytest.raises(PciError):
        s.add_capability(0x09, bytes(20))
    with pytest.raises(PciError):
        space().add_capability(0x09, bytes(4), writable=bytes(3))


def test_extended_space_reads_zero_and_ignores_writes():
    s = space()
    s.write(0x100, b"\xff" * 4)
    assert s.read(0x100, 4) == bytes(4) and s.read(0xFFC, 4) == bytes(4)
    with pytest.raises(PciError):
        s.read(0xFFE, 4)


def test_bad_identity_is_refused():
    with pytest.raises(PciError):
        PciConfigSpace(0xFFFF, 1, 0)
    with pytest.raises(PciError):
        PciConfigSpace(1, 1, 1 << 24)
    with pytest.raises(PciError):
        PciConfigSpace(1, 1, 0, interrupt_pin=5)


def test_save_restore_round_trip():
    s = space()
    s.add_bar(0, 0x1000)
    w32(s, cfg.BAR0, 0xC0000000)
    s.write(cfg.COMMAND, b"\x06\x00")
    state = through_json(s.save())
    other = space()
    other.add_bar(0, 0x1000)
    other.restore(state)
    assert other.read(0, 4096) == s.read(0, 4096)
    w32(other, cfg.BAR0, 0xFFFFFFFF)                                  # masks still work after restore
    assert u32(other, cfg.BAR0) == 0xFFFFF000


def test_restore_refuses_another_device_or_garbage():
    state = space().save()
    with pytest.raises(StateError, match="data: belongs to another device"):
        PciConfigSpace(0x8086, 0x1234, 0x020000).restore(state)
    for bad in ({}, {"data": "zz"}, {"data": "AAAA"}):
        with pytest.raises(StateError):
            PciConfigState.from_dict({"kind": "pci_config", "version": 1, "fields": bad})
