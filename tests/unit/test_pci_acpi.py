"""ACPI description of the PCI root: AML address descriptors, \\_SB.PCI0, the ECAM reservation,
MCFG and e820 (arch/x86_64/acpi.py, aml.py, layout.py), checked byte-wise and by ACPICA's
iasl and acpiexec (the interpreter and resource parser Linux uses)."""

import re
import struct

import pytest

from helpers.acpica import acpica_tool, disassemble_and_recompile, run
from pyvmm.arch.x86_64 import acpi, aml, layout
from pyvmm.bus import MmioBus, PioBus
from pyvmm.pci import PciRoot

GiB = 1 << 30


def make_root(memory=4 * GiB, mmio64=True):
    return PciRoot(PioBus(), MmioBus(), ecam_base=layout.PCI_ECAM_BASE,
                   mmio32_window=(layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE),
                   mmio64_window=layout.pci_mmio64_window(memory) if mmio64 else None,
                   io_window=(layout.PCI_IO_START, layout.PCI_IO_SIZE))


# --- AML resource descriptors ------------------------------------------------------------------


def test_address_space_descriptors():
    # WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0xff, 0, 0x100)
    assert aml.word_bus_number(0, 0xFF) == bytes.fromhex("88 0d00 02 0c 00 0000 0000 ff00 0000 0001")
    # WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0xd00, 0xffff, 0, 0xf300)
    assert aml.word_io(0xD00, 0xFFFF) == bytes.fromhex("88 0d00 01 0c 03 0000 000d ffff 0000 00f3")
    # DWordMemory(..., NonCacheable, ReadWrite, 0, 0xc0000000, 0xcfffffff, 0, 0x10000000)
    assert aml.dword_memory(0xC000_0000, 0xCFFF_FFFF) == bytes.fromhex(
        "87 1700 00 0c 01 00000000 000000c0 ffffffcf 00000000 00000010")
    q = aml.qword_memory(1 << 32, (1 << 36) - 1)
    assert q[:6] == bytes.fromhex("8a 2b00 00 0c 03") and len(q) == 3 + 43   # Cacheable, ReadWrite
    assert struct.unpack_from("<5Q", q, 6) == (0, 1 << 32, (1 << 36) - 1, 0, 0xF_0000_0000)
    assert aml.dword_memory(0, 0xFFF, producer=False, cacheability=aml.MEMORY_PREFETCHABLE,
                            writable=False)[4:6] == b"\x0d\x06"
    for bad in (lambda: aml.word_io(0x10, 0x0F), lambda: aml.word_io(0, 0x10000),
                lambda: aml.dword_memory(0, 1 << 32), lambda: aml.dword_memory(0, 1, cacheability=4)):
        with pytest.raises(aml.AmlError):
            bad()


def test_prt_entry_encoding():
    # Package(){0x0003FFFF, 1, Zero, 0x14}
    assert acpi.prt_entry(3, 1, 20) == bytes.fromhex("12 0b 04 0c ffff0300 01 00 0a14")
    with pytest.raises(acpi.AcpiError):
        acpi.prt_entry(32, 0, 16)


# --- \_SB.PCI0 and its companions ----------------------------------------------------------------


def test_pci_root_acpi_items():
    root = make_root()
    items, ecam = acpi.pci_root_acpi(root)
    bridge, reservation = items
    assert ecam == acpi.PciEcam(layout.PCI_ECAM_BASE, segment=0, start_bus=0, end_bus=0)
    assert ecam.window == (layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE)
    assert (bridge.name, bridge.hid, reservation.hid) == ("PCI0", "PNP0A08", "PNP0C02")
    assert reservation.resources == (aml.memory32_fixed(layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE),)
    body = bridge.aml()
    assert aml.name("_CID", aml.eisa_id("PNP0A03")) in body
    assert aml.name("_SEG", 0) in body and aml.name("_BBN", 0) in body
    assert aml.io(0xCF8, 0xCF8, 1, 8) in body
    assert aml.word_io(0, 0xCF7) + aml.word_io(0xD00, 0xFFFF) in body
    lo, size = root.mmio32_window
    assert aml.dword_memory(lo, lo + size - 1) in body
    lo, size = root.mmio64_window
    assert aml.qword_memory(lo, lo + size - 1) in body
    no64 = acpi.pci_root_acpi(make_root(mmio64=False))[0][0].aml()
    assert bytes([0x8A]) + struct.pack("<H", 43) not in no64


def test_windows_stay_clear_of_ram_and_reserved_ranges():
    """Linux clips e820-reserved ranges out of host bridge windows, and RAM must not overlap."""
    for memory in (512 << 20, 3 * GiB, 5 * GiB, 64 * GiB):
        root = make_root(memory)
        e820 = layout.e820_map(memory)
        assert (layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, 2) in [(e.address, e.size, e.kind) for e in e820]
        for base, size in (root.mmio32_window, root.mmio64_window):
            for e in e820:
                assert base + size <= e.address or e.address + e.size <= base, (hex(base), e)
        ecam = (layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE)
        for base, size in (root.mmio32_window, (layout.IOAPIC_BASE, 0x1000)):
            assert base + size <= ecam[0] or ecam[0] + ecam[1] <= base
        assert root.mmio32_window[0] + root.mmio32_window[1] <= 0xD000_0000   # platform MMIO from there
        assert root.mmio64_window[0] % GiB == 0 and root.mmio64_window[0] >= 4 * GiB


# --- ACPICA ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root():
    return make_root(8 * GiB)


@pytest.fixture(scope="module")
def tables(root):
    items, ecam = acpi.pci_root_acpi(root)
    placed = acpi.layout_acpi_tables(cpus=2, devices=[acpi.pvpanic_device(), *items], mcfg=ecam)
    return {data[:4]: data for _, data in placed[1:]}


EXPECTED = {
    b"DSDT": ["Device (PCI0)", 'EisaId ("PNP0A08")', 'EisaId ("PNP0A03")', "Name (_SEG, Zero)",
              "Name (_BBN, Zero)", "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
              "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,",
              "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
              "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,",
              "Name (_PRT, Package (0x7C)", "Device (ECAM)", 'EisaId ("PNP0C02")',
              "0xE0000000, // Address Base", "0x00100000, // Address Length"],
    b"MCFG": ["Base Address : 00000000E0000000", "Start Bus Number : 00", "End Bus Number : 00"],
}


@pytest.mark.parametrize("signature", sorted(EXPECTED))
def test_iasl_disassembles_and_recompiles_identically(signature, tables, tmp_path):
    table = tables[signature]
    recompiled = disassemble_and_recompile(table, signature, EXPECTED[signature], tmp_path)
    assert recompiled[36:] == table[36:] and len(recompiled) == len(table)


def test_acpiexec_reads_crs_and_prt_like_linux(root, tables, tmp_path):
    """`resources` runs AcpiGetIrqRoutingTable and AcpiGetCurrentResources, the calls Linux's
    PCI root driver makes: every descriptor must convert and the _PRT match the root's routing."""
    acpiexec = acpica_tool("acpiexec")
    files = []
    for signature in (b"DSDT", b"FACP", b"APIC"):
        path = tmp_path / f"{signature.decode().lower()}.dat"
        path.write_bytes(tables[signature])
        files.append(path.name)
    output = run([acpiexec, "-b", "resources \\_SB.PCI0; resources \\_SB.ECAM", *files], tmp_path)
    crs_part = output.split("Evaluating _SRS")[0]
    assert not re.search(r"ACPI (Error|Exception)|AE_(?!NOT_FOUND)", crs_part), output

    prt = [(int(a, 16), int(p, 16), int(g, 16)) for a, p, g in re.findall(
        r"PCI IRQ Routing Table Package\s+Address : ([0-9A-F]+)\s+Pin : ([0-9A-F]+)\s+"
        r"Source : \[NULL NAMESTRING\]\s+Source Index : ([0-9A-F]+)", output)]
    assert prt == [(slot << 16 | 0xFFFF, pin, gsi) for slot, pin, gsi in root.intx_routes()]

    def field(name):
        return re.findall(rf"{name} : ([0-9A-F]+)", output)

    lo32, size32 = root.mmio32_window
    lo64, size64 = root.mmio64_window
    minimums = [int(v, 16) for v in field("Address Minimum")]
    maximums = [int(v, 16) for v in field("Address Maximum")]
    assert list(zip(minimums, maximums))[:6] == [
        (0, 0), (0xCF8, 0xCF8), (0, 0xCF7), (0xD00, 0xFFFF), (lo32, lo32 + size32 - 1), (lo64, lo64 + size64 - 1)]
    assert "ResourceProducer" in output and "Bus Number Range" in output
    assert re.search(r"32-Bit Fixed Memory Range Resource\s+Write Protect : ReadWrite\s+"
                     r"Address : E0000000\s+Address Length : 00100000", output), output
