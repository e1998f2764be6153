"""ACPI tables and the AML encoder (arch/x86_64/acpi.py, aml.py).

Byte layouts are checked against hand-computed values and spec offsets, and then by the
real ACPICA tools (package acpica-tools): `iasl -d` must decode every table without
complaint and its disassembly must compile back to the same bytes; `acpiexec` loads the
tables with the interpreter Linux uses and performs the S5 power-off sequence.
"""

import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers.acpica import acpica_tool, disassemble_and_recompile, run
from pyvmm.arch.x86_64 import acpi, aml, layout
from pyvmm.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def memory():
    m = GuestMemory.from_specs(layout.ram_regions(16 * MiB))
    yield m
    m.close()


def header(table: bytes) -> dict:
    sig, length, rev, csum, oem, oem_table, oem_rev, creator, creator_rev = struct.unpack_from(
        "<4sIBB6s8sI4sI", table)
    return dict(signature=sig, length=length, revision=rev, oem_id=oem, oem_table_id=oem_table)


def assert_valid_table(table: bytes, signature: bytes) -> None:
    h = header(table)
    assert h["signature"] == signature
    assert h["length"] == len(table)
    assert sum(table) % 256 == 0, f"{signature} checksum"
    assert h["oem_id"] == b"PYVMM "


def read_table(memory, address: int) -> bytes:
    length = memory.read_u32(address + 4)
    return memory.read(address, length)


# --- AML encoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"),
    (1, b"\x01"),
    (2, b"\x0a\x02"),
    (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"),
    (0xFFFF, b"\x0b\xff\xff"),
    (0x10000, b"\x0c\x00\x00\x01\x00"),
    (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
    (0x1_0000_0000, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
    ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
])
def test_integer_encodings(value, encoded):
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("bad", [-1, 1 << 64, True, 1.5])
def test_integer_rejects_out_of_range(bad):
    with pytest.raises(aml.AmlError):
        aml.integer(bad)


def test_strings_and_names():
    assert aml.string("COM1") == b"\x0dCOM1\x00"
    assert aml.name_seg("_S5") == b"_S5_"
    assert aml.name_string("\\_SB_.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("_SB.PCI0.S08") == b"\x2f\x03_SB_PCI0S08_"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("1ABC", "ABCDE", "a", "", "AB-C"):
        with pytest.raises(aml.AmlError):
            aml.name_string(bad)


@pytest.mark.parametrize("payload, encoded", [
    (0, b"\x01"),
    (62, b"\x3f"),                  # total 63: the largest one-byte PkgLength
    (63, b"\x41\x04"),              # total 64 does not fit 6 bits -> 2 bytes, total 65 = 0x041
    (4093, b"\x4f\xff"),            # total 4095 = 0xfff: the largest two-byte PkgLength
    (4094, b"\x81\x00\x01"),        # two bytes would make 4096 -> 3 bytes, total 4097 = 0x01001
    (4095, b"\x82\x00\x01"),        # total 4098
    ((1 << 20) - 4, b"\x8f\xff\xff"),     # total 2^20-1: the largest three-byte PkgLength
    ((1 << 20) - 3, b"\xc1\x00\x00\x01"),  # three bytes would make 2^20 -> 4 bytes, total 2^20+1
])
def test_pkg_length_boundaries(payload, encoded):
    assert aml.pkg_length(payload) == encoded


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(encoded length, number of PkgLength bytes), an independent reading of ACPI 20.2.4."""
    lead = data[0]
    count = lead >> 6
    if count == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(count):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + count


@given(st.integers(min_value=0, max_value=(1 << 28) - 5))
def test_pkg_length_counts_itself(payload):
    encoded = aml.pkg_length(payload)
    total, size = decode_pkg_length(encoded)
    assert size == len(encoded)
    assert total == payload + size
    if size > 1:
        assert encoded[0] & 0x30 == 0   # bits 4-5 of a multi-byte lead byte are reserved


def test_pkg_length_too_long():
    with pytest.raises(aml.AmlError):
        aml.pkg_length(1 << 28)


def test_package_lengths_across_the_boundary():
    # 62 bytes of payload after the PkgLength -> one-byte length; 63 -> two bytes.
    small = aml.package([0xAA] * 30 + [0] * 1)    # 1 (count) + 30*2 + 1 = 62
    assert small[:3] == b"\x12\x3f\x1f"
    big = aml.package([0xAA] * 31)                 # 1 + 62 = 63
    assert big[:4] == b"\x12\x41\x04\x1f"
    assert len(big) == 1 + 65


def test_eisa_id():
    assert aml.eisa_id_value("PNP0501") == 0x0105D041
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    assert aml.eisa_id_value("PNP0303") == 0x0303D041
    for bad in ("PNP050", "pnp0501", "PNP05G1", "LNRO0005"):
        with pytest.raises(aml.AmlError):
            aml.eisa_id_value(bad)


def test_s5_package():
    assert aml.name("_S5", aml.package([5, 5, 0, 0])) == bytes.fromhex("085f53355f 12 08 04 0a05 0a05 00 00")


def test_resource_descriptors():
    assert aml.io(0x3F8, 0x3F8, 1, 8) == bytes.fromhex("47 01 f803 f803 01 08")
    assert aml.irq_no_flags(4) == bytes.fromhex("22 1000")
    assert aml.memory32_fixed(0xD0000000, 0x1000) == bytes.fromhex("86 0900 01 000000d0 00100000")
    # Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {5}
    assert aml.interrupt(5) == bytes.fromhex("89 0600 03 01 05000000")
    # Interrupt(ResourceConsumer, Level, ActiveLow, Shared) {16, 17}
    assert aml.interrupt(16, 17, edge=False, active_low=True, shared=True) == bytes.fromhex(
        "89 0a00 0d 02 10000000 11000000")
    assert aml.end_tag() == b"\x79\x00"
    template = aml.resource_template([aml.io(0x3F8, 0x3F8, 1, 8)])
    # BufferOp, PkgLength 13 (itself + BufferSize 0x0a 0x0a + 10 bytes), descriptors, End Tag.
    assert template == bytes.fromhex("11 0d 0a 0a 47 01 f803 f803 01 08 79 00")


def test_scope_device_method():
    dev = aml.device("COM1", [aml.name("_UID", 1)])
    assert dev == b"\x5b\x82\x0b" + b"COM1" + b"\x08_UID\x01"
    assert aml.scope("\\_SB_", []) == b"\x10\x06\\_SB_"
    sta = aml.method("_STA", 0, [aml.return_(0x0F)])
    assert sta == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.method("FOO", 2, [], serialized=True, sync_level=3)[6] == 0x3A


# --- tables --------------------------------------------------------------------------------------------


def test_rsdp_checksums_and_fields():
    rsdp = acpi.build_rsdp(0x1234_5678_9ABC)
    assert len(rsdp) == 36
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0
    assert rsdp[15] == 2                                   # revision: ACPI 2.0+
    assert struct.unpack_from("<I", rsdp, 16)[0] == 0      # no RSDT
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert struct.unpack_from("<Q", rsdp, 24)[0] == 0x1234_5678_9ABC


def test_fadt_fields_at_spec_offsets():
    fadt = acpi.build_fadt(0xE0190)
    assert_valid_table(fadt, b"FACP")
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5       # revision 6.5
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20)                                           # HW_REDUCED_ACPI
    assert flags & (1 << 10)                                           # RESET_REG_SUP
    assert struct.unpack_from("<I", fadt, 40)[0] == 0                  # 32-bit DSDT unused
    assert struct.unpack_from("<Q", fadt, 140)[0] == 0xE0190           # X_DSDT
    assert struct.unpack_from("<H", fadt, 46)[0] == 0                  # no SCI
    assert fadt[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, layout.ACPI_RESET_PORT)
    assert fadt[128] == layout.ACPI_RESET_VALUE
    assert fadt[244:256] == struct.pack("<BBBBQ", 1, 8, 0, 1, layout.ACPI_SLEEP_CONTROL_PORT)
    assert fadt[256:268] == struct.pack("<BBBBQ", 1, 8, 0, 1, layout.ACPI_SLEEP_STATUS_PORT)
    assert fadt[268:276] == b"PYVMM   "
    # No PM timer, PM1 or GPE blocks, legacy or extended.
    assert fadt[56:88] == bytes(32) and fadt[148:244] == bytes(96)
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & acpi.IAPC_8042
    assert boot_arch & acpi.IAPC_VGA_NOT_PRESENT
    assert boot_arch & acpi.IAPC_CMOS_RTC_NOT_PRESENT
    assert not boot_arch & acpi.IAPC_MSI_NOT_SUPPORTED
    assert fadt[108] == 0                                              # no RTC century register


def test_boot_arch_parameters():
    flags = acpi.iapc_boot_arch(i8042=False, vga=True, cmos_rtc=True)
    assert not flags & (acpi.IAPC_8042 | acpi.IAPC_VGA_NOT_PRESENT | acpi.IAPC_CMOS_RTC_NOT_PRESENT)
    assert flags & acpi.IAPC_LEGACY_DEVICES


def test_fadt_century_index():
    fadt = acpi.build_fadt(0xE0190, century=0x32)
    assert_valid_table(fadt, b"FACP")
    assert fadt[106:109] == bytes((0, 0, 0x32))                        # no day/month alarm, century 0x32
    for bad in (-1, 0x80):
        with pytest.raises(acpi.AcpiError):
            acpi.build_fadt(0xE0190, century=bad)


def test_cmos_rtc_is_described_in_the_dsdt_and_fadt():
    tables = {data[:4]: data for _, data in acpi.layout_acpi_tables(cpus=1, cmos_rtc=True)[1:]}
    fadt, body = tables[b"FACP"], tables[b"DSDT"][36:]
    # Linux registers rtc_cmos only without CMOS_RTC_NOT_PRESENT, and reads the century at 0x32.
    assert not struct.unpack_from("<H", fadt, 109)[0] & acpi.IAPC_CMOS_RTC_NOT_PRESENT
    assert fadt[108] == acpi.CMOS_RTC_CENTURY == 0x32
    assert aml.eisa_id("PNP0B00") in body and b"RTC_" in body
    assert aml.io(0x70, 0x70, 1, 2) + aml.interrupt(8) in body
    plain = {data[:4]: data for _, data in acpi.layout_acpi_tables(cpus=1)[1:]}
    assert aml.eisa_id("PNP0B00") not in plain[b"DSDT"] and plain[b"FACP"][108] == 0


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        assert length >= 2
        entries.append((kind, madt[offset:offset + length]))
        offset += length
    assert offset == len(madt)
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_madt_entries(cpus):
    madt = acpi.build_madt(cpus)
    assert_valid_table(madt, b"APIC")
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)     # LAPIC address, PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [e for k, e in entries if k == 0]
    assert [struct.unpack("<BBBBI", e)[2:] for e in lapics] == [(i, i, 1) for i in range(cpus)]
    ioapics = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapics == [(1, 12, 0, 0, layout.IOAPIC_BASE, 0)]
    overrides = [struct.unpack("<BBBBIH", e) for k, e in entries if k == 2]
    assert overrides == [(2, 10, 0, 0, 2, 0)]                          # ISA IRQ0 -> GSI2, conforming
    nmis = [struct.unpack("<BBBHB", e) for k, e in entries if k == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]                                # LINT1 on all processors
    assert len(madt) == 44 + 8 * cpus + 12 + 10 + 6


@pytest.mark.parametrize("cpus", [0, 256])
def test_madt_rejects_cpu_counts(cpus):
    with pytest.raises(acpi.AcpiError):
        acpi.build_madt(cpus)


def test_mcfg_layout():
    mcfg = acpi.build_mcfg([acpi.PciEcam(0xB000_0000, segment=0, start_bus=0, end_bus=255)])
    assert_valid_table(mcfg, b"MCFG")
    assert len(mcfg) == 44 + 16 and mcfg[36:44] == bytes(8)
    assert struct.unpack_from("<QHBB", mcfg, 44) == (0xB000_0000, 0, 0, 255)
    assert acpi.PciEcam(0xB000_0000, start_bus=1, end_bus=2).window == (0xB010_0000, 2 * MiB)
    with pytest.raises(acpi.AcpiError):
        acpi.PciEcam(0xB000_1000)
    with pytest.raises(acpi.AcpiError):
        acpi.PciEcam(0xB000_0000, start_bus=3, end_bus=2)


def test_dsdt_contents():
    dsdt = acpi.build_dsdt()
    assert_valid_table(dsdt, b"DSDT")
    assert dsdt[8] == 2
    body = dsdt[36:]
    assert aml.name("_S5_", aml.package([5, 5, 0, 0])) in body
    assert aml.eisa_id("PNP0501") in body
    assert aml.io(0x3F8, 0x3F8, 1, 8) + aml.interrupt(4) in body
    assert b"COM1" not in acpi.build_dsdt(com1=False)[36:]


def test_dsdt_devices_and_raw_terms():
    raw = aml.scope("\\_SB_", [aml.name("FLAG", 7)])
    dsdt = acpi.build_dsdt([acpi.virtio_mmio_device(3, 0xD000_3000, 0x200, 8), raw])
    body = dsdt[36:]
    assert aml.string("LNRO0005") in body and b"VR03" in body
    assert aml.memory32_fixed(0xD000_3000, 0x200) + aml.interrupt(8) in body
    assert body.endswith(raw)
    with pytest.raises(acpi.AcpiError):
        acpi.build_dsdt([42])


def test_pointer_chain_in_guest_memory(memory):
    rsdp_address = acpi.build_acpi_tables(memory, cpus=2)
    assert rsdp_address == layout.ACPI_RSDP
    rsdp = memory.read(rsdp_address, 36)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0

    xsdt_address = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = read_table(memory, xsdt_address)
    assert_valid_table(xsdt, b"XSDT")
    pointers = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    tables = {read_table(memory, p)[:4]: (p, read_table(memory, p)) for p in pointers}
    assert set(tables) == {b"FACP", b"APIC"}

    fadt_address, fadt = tables[b"FACP"]
    assert_valid_table(fadt, b"FACP")
    dsdt_address = struct.unpack_from("<Q", fadt, 140)[0]
    dsdt = read_table(memory, dsdt_address)
    assert_valid_table(dsdt, b"DSDT")
    assert len(madt_entries(tables[b"APIC"][1])) == 2 + 3

    # Everything inside the ACPI area, nothing overlapping, RSDP 16-byte aligned.
    spans = sorted([(rsdp_address, 36), (xsdt_address, len(xsdt)), (dsdt_address, len(dsdt))]
                   + [(a, len(t)) for a, t in tables.values()])
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b
    assert spans[0][0] >= layout.ACPI_TABLES_START and spans[-1][0] + spans[-1][1] <= layout.ACPI_TABLES_END
    assert rsdp_address % 16 == 0


def test_mcfg_is_listed_when_asked(memory):
    acpi.build_acpi_tables(memory, cpus=1, mcfg=acpi.PciEcam(0xB000_0000, end_bus=255))
    xsdt_address = memory.read_u64(layout.ACPI_RSDP + 24)
    xsdt = read_table(memory, xsdt_address)
    signatures = [read_table(memory, p)[:4] for p in struct.unpack_from("<3Q", xsdt, 36)]
    assert signatures == [b"FACP", b"APIC", b"MCFG"]


def test_tables_that_do_not_fit_are_refused(memory):
    many = [acpi.virtio_mmio_device(i, 0xD000_0000 + i * 0x1000, 0x1000, 5 + i % 16) for i in range(256)]
    placed = acpi.layout_acpi_tables(cpus=1, devices=many)
    end = max(a + len(d) for a, d in placed)
    with pytest.raises(acpi.AcpiError, match="fit"):
        acpi.layout_acpi_tables(cpus=1, devices=many, limit=end - 1)
    huge = [aml.name("BIG_", aml.buffer(bytes(0x20000)))]
    with pytest.raises(acpi.AcpiError):
        acpi.build_acpi_tables(memory, cpus=1, devices=huge)


# --- ACPICA: iasl and acpiexec -----------------------------------------------------------------


ALL_DEVICES = dict(
    cpus=8,
    devices=[acpi.virtio_mmio_device(0, 0xD000_0000, 0x1000, 5), acpi.i8042_keyboard_device()],
    mcfg=acpi.PciEcam(0xB000_0000, end_bus=255),
    cmos_rtc=True,
)


@pytest.fixture(scope="module")
def placed_tables():
    return {data[:4]: data for _, data in acpi.layout_acpi_tables(**ALL_DEVICES)[1:]}


EXPECTED_IN_DISASSEMBLY = {
    b"XSDT": ["ACPI Table Address   0", "ACPI Table Address   2"],
    b"FACP": ["Hardware Reduced (V5) : 1", "Reset Register Supported (V2) : 1",
              "8042 Present on ports 60/64 (V2) : 1", "Address : 0000000000000600",
              "Address : 0000000000000601", "Address : 0000000000000602",
              "Value to cause reset : 01", "RTC Century Index : 32", "CMOS RTC Not Present (V5) : 0"],
    b"APIC": ["[Processor Local APIC]", "[I/O APIC]", "[Interrupt Source Override]",
              "[Local APIC NMI]", "Local Apic ID : 07", "PC-AT Compatibility : 1"],
    b"MCFG": ["Base Address : 00000000B0000000", "End Bus Number : FF"],
    b"DSDT": ["Name (_S5, Package (0x04)", 'EisaId ("PNP0501")', 'Name (_HID, "LNRO0005")',
              "Memory32Fixed (ReadWrite,", "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive",
              "Device (COM1)", 'EisaId ("PNP0303")', "Device (RTC)", 'EisaId ("PNP0B00")',
              "0x0070, // Range Minimum", "0x02, // Length"],
}


@pytest.mark.parametrize("signature", sorted(EXPECTED_IN_DISASSEMBLY))
def test_iasl_disassembles_and_recompiles_identically(signature, placed_tables, tmp_path):
    table = placed_tables[signature]
    # ACPICA's reading of every field must reproduce our bytes (all but the compiler
    # ID/revision, which iasl stamps with its own, and the checksum).
    recompiled = disassemble_and_recompile(table, signature, EXPECTED_IN_DISASSEMBLY[signature], tmp_path)
    assert len(recompiled) == len(table)
    assert recompiled[:9] == table[:9] and recompiled[10:28] == table[10:28]
    assert recompiled[36:] == table[36:]


def test_acpiexec_powers_off_through_the_sleep_registers(placed_tables, tmp_path):
    """ACPICA's interpreter (Linux's) loads the namespace and runs the S5 sequence: it clears
    WAK_STS in SLEEP_STATUS_REG, then writes SLP_TYP=5 | SLP_EN to SLEEP_CONTROL_REG."""
    acpiexec = acpica_tool("acpiexec")
    files = []
    for signature in (b"DSDT", b"FACP", b"APIC"):
        path = tmp_path / f"{signature.decode().lower()}.dat"
        path.write_bytes(placed_tables[signature])
        files.append(path.name)
    # 0x04000000 = ACPI_LV_IO: log every register access.
    output = run([acpiexec, "-x", "0x04000000", "-b",
                  "evaluate \\_S5_; evaluate \\_SB.COM1._HID; evaluate \\_SB.RTC._HID; evaluate \\_SB.VR00._CRS; sleep 5", *files],
                 tmp_path)
    assert not re.search(r"ACPI (Error|Exception)|AE_", output), output
    assert "[Integer] = 000000000105D041" in output
    assert "[Integer] = 00000000000BD041" in output                    # PNP0B00
    assert re.search(r"\[Package\] Contains 4 Elements:\s+\[Integer\] = 0+5\s+\[Integer\] = 0+5", output)
    writes = [(int(v, 16), int(p, 16)) for v, p in
              re.findall(r"Wrote: ([0-9A-F]+) width\s+8\s+to ([0-9A-F]+) \(SystemIO\)", output)]
    control = (acpi.S5_SLP_TYP << acpi.SLP_TYP_SHIFT) | acpi.SLP_EN
    assert control == 0x34
    assert (control, layout.ACPI_SLEEP_CONTROL_PORT) in writes
    assert writes.index((acpi.WAK_STS, layout.ACPI_SLEEP_STATUS_PORT)) < writes.index(
        (control, layout.ACPI_SLEEP_CONTROL_PORT))
