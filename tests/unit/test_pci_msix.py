"""MSI-X capability, table and PBA (src/pyvmm/pci/msix.py) through a device's BAR."""

import struct

import pytest

from helpers.state import changed, through_json
from pyvmm.pci.msix_state import MsixState
from pyvmm.persist import StateError

from pyvmm.bus import MmioBus, PioBus
from pyvmm.pci import PciDevice, PciError
from pyvmm.pci import config as cfg
from pyvmm.pci import msix as mx

BAR_ADDRESS = 0xC000_0000
TABLE, PBA = 0x0, 0x800


class FakeMsiVector:
    def __init__(self, index):
        self.index = index
        self.configured = []      # (address, data, masked) per configure() call
        self.sent = 0
        self.closed = False

    def configure(self, address, data, masked):
        self.configured.append((address, data, masked))

    def trigger(self):
        self.sent += 1

    def close(self):
        self.closed = True

    @property
    def state(self):
        return self.configured[-1] if self.configured else None


class Factory:
    def __init__(self):
        self.made = []

    def __call__(self):
        vector = FakeMsiVector(len(self.made))
        self.made.append(vector)
        return vector


class Fixture:
    def __init__(self, vectors=4):
        self.device = PciDevice(0x1AF4, 0x1041, 0x020000)
        self.device.add_bar(1, 0x1000)
        self.msix = self.device.add_msix(vectors, bar=1, table_offset=TABLE, pba_offset=PBA)
        self.mmio = MmioBus()
        self.factory = Factory()
        self.device.config.set_bar_address(1, BAR_ADDRESS)
        self.device.config.put(cfg.COMMAND, 2, cfg.COMMAND_MEMORY)
        self.device.attach(pio=PioBus(), mmio=self.mmio, msi_vector=self.factory)
        self.vectors = self.factory.made
        self.cap = self.msix.offset

    def control(self, value):
        self.device.config_write(self.cap + 2, struct.pack("<H", value))

    def write_entry(self, vector, address, data, masked):
        base = BAR_ADDRESS + TABLE + 16 * vector
        self.mmio.write(base, struct.pack("<I", address & 0xFFFFFFFF))
        self.mmio.write(base + 4, struct.pack("<I", address >> 32))
        self.mmio.write(base + 8, struct.pack("<I", data))
        self.mmio.write(base + 12, struct.pack("<I", int(masked)))

    def unmask(self, vector, masked=False):
        self.mmio.write(BAR_ADDRESS + TABLE + 16 * vector + 12, struct.pack("<I", int(masked)))

    def pba(self):
        return int.from_bytes(self.mmio.read(BAR_ADDRESS + PBA, 8), "little")


ENABLE, FMASK = mx.CONTROL_ENABLE, mx.CONTROL_FUNCTION_MASK


def test_capability_layout():
    f = Fixture(vectors=4)
    cap = f.device.config.read(f.cap, 12)
    assert cap[0] == cfg.CAP_ID_MSIX
    control, table, pba = struct.unpack_from("<HII", cap, 2)
    assert control == 3                                  # table size N-1, disabled, unmasked
    assert table == TABLE | 1 and pba == PBA | 1         # offsets with BIR = BAR 1
    f.device.config_write(f.cap + 2, b"\xff\xff")        # only enable and function mask are writable
    assert f.device.config.get(f.cap + 2, 2) == 0xC003
    f.device.config_write(f.cap + 4, b"\xff" * 8)
    assert f.device.config.read(f.cap + 4, 8) == struct.pack("<II", TABLE | 1, PBA | 1)


def test_table_reset_state_and_access_sizes():
    f = Fixture(vectors=2)
    assert f.mmio.read(BAR_ADDRESS + 12, 4) == b"\x01\0\0\0"       # vectors start masked
    f.mmio.write(BAR_ADDRESS + 0, struct.pack("<Q", 0x1_FEE0_0000))  # 64-bit access to address lo/hi
    assert f.mmio.read(BAR_ADDRESS, 8) == struct.pack("<Q", 0x1_FEE0_0000)
    f.mmio.write(BAR_ADDRESS + 12, b"\xff\xff\xff\xff")             # reserved control bits stay 0
    assert f.mmio.read(BAR_ADDRESS + 12, 4) == b"\x01\0\0\0"
    assert f.msix.entry(0) == (0x1_FEE0_0000, 0, True)


def test_vectors_configured_masked_until_enabled():
    f = Fixture()
    assert len(f.vectors) == 4 and all(v.state == (0, 0, True) for v in f.vectors)
    f.write_entry(0, 0xFEE0_0000, 0x4041, masked=False)
    assert f.vectors[0].state == (0xFEE0_0000, 0x4041, True)        # MSI-X still disabled
    f.control(ENABLE)
    assert f.vectors[0].state == (0xFEE0_0000, 0x4041, False)
    assert f.vectors[1].state == (0, 0, True)                       # its own mask bit is set


def test_configure_called_only_on_change():
    f = Fixture()
    f.control(ENABLE)
    calls = len(f.vectors[2].configured)
    f.control(ENABLE)                                              # same control value again
    f.unmask(2, masked=True)                                       # mask bit already set
    assert len(f.vectors[2].configured) == calls


def test_delivery_and_pending_on_vector_mask():
    f = Fixture()
    f.control(ENABLE)
    f.write_entry(1, 0xFEE0_0000, 0x31, masked=False)
    assert f.msix.notify(1) and f.vectors[1].sent == 1 and f.pba() == 0
    f.unmask(1, masked=True)
    assert f.msix.notify(1) and f.vectors[1].sent == 1
    assert f.pba() == 0b10 and f.msix.is_pending(1)
    f.msix.notify(1)                                               # a second event: still one pending bit
    f.unmask(1)
    assert f.vectors[1].sent == 2 and f.pba() == 0                  # sent once on unmask, bit cleared


def test_function_mask_holds_all_vectors():
    f = Fixture()
    for v in range(4):
        f.write_entry(v, 0xFEE0_0000, 0x40 + v, masked=False)
    f.control(ENABLE | FMASK)
    assert all(v.state[2] for v in f.vectors)
    f.msix.notify(0)
    f.msix.notify(3)
    assert f.pba() == 0b1001 and all(v.sent == 0 for v in f.vectors)
    f.unmask(3, masked=True)                                       # vector 3 also masked on its own
    f.control(ENABLE)
    assert [v.sent for v in f.vectors] == [1, 0, 0, 0]
    assert f.pba() == 0b1000
    f.unmask(3)
    assert [v.sent for v in f.vectors] == [1, 0, 0, 1] and f.pba() == 0


def test_disabled_msix_sends_nothing_and_sets_no_pending():
    f = Fixture()
    f.write_entry(0, 0xFEE0_0000, 0x41, masked=False)
    assert f.msix.notify(0) is False                               # the device falls back to INTx
    assert f.pba() == 0 and f.vectors[0].sent == 0
    f.control(ENABLE)
    assert f.msix.notify(7) is False                               # no such vector


def test_pba_is_read_only_and_sized_in_qwords():
    f = Fixture(vectors=65)
    assert f.msix.pba_size == 16 and f.msix.table_size == 65 * 16
    f.control(ENABLE)
    f.msix.notify(64)
    f.mmio.write(BAR_ADDRESS + PBA + 8, b"\0" * 8)
    assert f.mmio.read(BAR_ADDRESS + PBA + 8, 8) == b"\x01" + bytes(7)


def test_other_bar_offsets_reach_the_device():
    class Dev(PciDevice):
        def __init__(self):
            super().__init__(0x1AF4, 0x1041, 0x020000)
            self.seen = []

        def bar_read(self, index, offset, size):
            self.seen.append(("r", index, offset, size))
            return b"\xab" * size

        def bar_write(self, index, offset, data):
            self.seen.append(("w", index, offset, bytes(data)))

    d = Dev()
    d.add_bar(0, 0x2000)
    d.add_msix(2, bar=0, table_offset=0x1000, pba_offset=0x1800)
    mmio = MmioBus()
    d.config.set_bar_address(0, BAR_ADDRESS)
    d.config.put(cfg.COMMAND, 2, cfg.COMMAND_MEMORY)
    d.attach(pio=PioBus(), mmio=mmio)
    assert mmio.read(BAR_ADDRESS + 0x10, 2) == b"\xab\xab"
    mmio.write(BAR_ADDRESS + 0x20, b"\x01")
    assert mmio.read(BAR_ADDRESS + 0x100C, 4) == b"\x01\0\0\0"       # table, not the device
    assert d.seen == [("r", 0, 0x10, 2), ("w", 0, 0x20, b"\x01")]


def test_msix_declaration_errors():
    d = PciDevice(1, 2, 0)
    with pytest.raises(PciError):
        d.add_msix(2, bar=0, table_offset=0, pba_offset=0x800)    # BAR 0 not declared
    d.add_bar(0, 0x1000)
    with pytest.raises(PciError):
        d.add_msix(0, bar=0, table_offset=0, pba_offset=0x800)
    with pytest.raises(PciError):
        d.add_msix(2, bar=0, table_offset=4, pba_offset=0x800)    # not 8-byte aligned
    with pytest.raises(PciError):
        d.add_msix(256, bar=0, table_offset=0, pba_offset=0x800)  # table overlaps the PBA
    with pytest.raises(PciError):
        d.add_msix(2, bar=0, table_offset=0, pba_offset=0x1000)   # PBA past the BAR
    d.add_bar(1, 0x10, kind=cfg.BarKind.IO)
    with pytest.raises(PciError):
        d.add_msix(2, bar=1, table_offset=0, pba_offset=0x8)      # I/O BAR


def test_save_restore_reconfigures_and_keeps_pending():
    f = Fixture()
    f.control(ENABLE | FMASK)
    f.write_entry(2, 0xFEE0_1000, 0x55, masked=False)
    f.msix.notify(2)
    state = through_json(f.device.save())

    g = Fixture()
    g.device.restore(state)
    assert g.msix.entry(2) == (0xFEE0_1000, 0x55, False)
    assert g.vectors[2].state == (0xFEE0_1000, 0x55, True) and g.pba() == 0b100
    g.control(ENABLE)
    assert g.vectors[2].sent == 1 and g.pba() == 0
    assert g.device.save().msix == changed(state.msix, pending=0)
    with pytest.raises(StateError, match="table: 1 bytes is not whole 16-byte entries"):
        MsixState(table=b"\x00", pending=0)
    with pytest.raises(StateError, match="pending: 0x100 has bits beyond"):
        g.msix.restore(MsixState(table=bytes(g.msix.table_size), pending=1 << 8))
    assert g.msix.entry(2) == (0xFEE0_1000, 0x55, False)


def test_close_releases_vectors():
    f = Fixture()
    f.msix.close()
    assert all(v.closed for v in f.vectors)
    f.control(ENABLE)
    f.write_entry(0, 0xFEE0_0000, 1, masked=False)
    assert f.msix.notify(0) is True                                # accepted, but nowhere to go
