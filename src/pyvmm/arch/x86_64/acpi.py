"""The ACPI tables pyvmm gives an x86-64 guest: RSDP -> XSDT -> {FADT -> DSDT, MADT, [MCFG]}.

The platform is "hardware-reduced" ACPI (ACPI 6.5, 4.1): no PM timer, no PM1/GPE
blocks, no SCI. What Linux needs from it:

* MADT: the local APICs (SMP), the IOAPIC (and so MSI), IRQ0 -> GSI2, LINT1 = NMI.
* FADT: power-off through SLEEP_CONTROL_REG (the guest writes SLP_TYP<<2 | SLP_EN,
  SLP_TYP taken from the DSDT's \\_S5 package), reboot through RESET_REG.
* DSDT: \\_S5 and the devices that are only discoverable through ACPI (virtio-mmio),
  plus COM1 (see `com1_device`) and, with `cmos_rtc`, the CMOS RTC (see `rtc_device`).

Every ``build_*`` function is pure and returns the table's bytes; `build_acpi_tables`
places them in guest memory. Table layouts follow the ACPI 6.5 spec, chapter 5.2.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

from ...errors import PyvmmError
from . import aml, layout

log = logging.getLogger(__name__)

OEM_ID = b"PYVMM "             # 6 bytes
OEM_TABLE_PREFIX = b"PYVM"     # + the table's signature: "PYVMFACP", "PYVMAPIC", ...
OEM_REVISION = 1
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR_ID = b"PYVMM   "

HEADER_SIZE = 36
RSDP_SIZE = 36
TABLE_ALIGN = 16               # RSDP must be 16-aligned; the rest are aligned alike for tidiness


class AcpiError(PyvmmError, ValueError):
    """The requested tables cannot be built or do not fit in the ACPI area."""


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with that byte in place of a zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes, *, oem_table_id: bytes | None = None) -> bytes:
    """A System Description Table: the 36-byte header (5.2.6) with its checksum, then `body`."""
    assert len(signature) == 4
    table_id = oem_table_id if oem_table_id is not None else OEM_TABLE_PREFIX + signature
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature, HEADER_SIZE + len(body), revision, 0, OEM_ID, table_id.ljust(8, b" ")[:8],
        OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


# --- Generic Address Structure (5.2.3.2) ---------------------------------------------------

GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1


def gas(space_id: int, bit_width: int, address: int, *, bit_offset: int = 0, access_size: int = 0) -> bytes:
    return struct.pack("<BBBBQ", space_id, bit_width, bit_offset, access_size, address)


def io_port_register(port: int) -> bytes:
    """An 8-bit register at an I/O port, accessed bytewise (Linux insists on width 8 for RESET_REG)."""
    return gas(GAS_SYSTEM_IO, 8, port, access_size=GAS_ACCESS_BYTE)


# --- RSDP (5.2.5) and XSDT (5.2.8) ------------------------------------------------------------


def build_rsdp(xsdt_address: int) -> bytes:
    """RSDP revision 2: no RSDT (address 0), the XSDT at a 64-bit address; both checksums."""
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_SIZE, xsdt_address, 0))
    rsdp[8] = checksum(rsdp[:20])      # ACPI 1.0 checksum: the first 20 bytes only
    rsdp[32] = checksum(rsdp)          # extended checksum: all 36 bytes
    return bytes(rsdp)


def build_xsdt(table_addresses: Sequence[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in table_addresses))


# --- FADT (5.2.9) ------------------------------------------------------------------------------

FADT_REVISION = 6
FADT_MINOR_REVISION = 5        # ACPI 6.5
FADT_SIZE = 276

# Fixed feature flags (5.2.9, table 5.10).
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20

# IA-PC boot architecture flags (5.2.9.3).
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# Field offsets used below and by tests.
FADT_DSDT = 40
FADT_SCI_INT = 46
FADT_CENTURY = 108
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_X_DSDT = 140
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR_ID = 268

# What the guest writes to SLEEP_CONTROL_REG (hardware-reduced sleep, 4.8.3.7).
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x07 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
WAK_STS = 1 << 7               # in SLEEP_STATUS_REG; write 1 to clear
S5_SLP_TYP = 5

# The CMOS index of the RTC's century register (devices/legacy/rtc.py CENTURY), as on PCs.
CMOS_RTC_CENTURY = 0x32


def iapc_boot_arch(*, i8042: bool = True, vga: bool = False, cmos_rtc: bool = False,
                   legacy_devices: bool = True) -> int:
    """IAPC_BOOT_ARCH. Linux reads the 8042 bit (absent -> the i8042 driver gives up), the
    CMOS_RTC_NOT_PRESENT bit (set -> no rtc_cmos platform device; `cmos_rtc=True` clears it) and
    the VGA bit (absent -> no legacy VGA probes).
    ASPM stays with "firmware": there is no real PCIe link to manage. MSI is supported."""
    flags = IAPC_PCIE_ASPM_CONTROLS
    flags |= IAPC_LEGACY_DEVICES if legacy_devices else 0
    flags |= IAPC_8042 if i8042 else 0
    flags |= 0 if vga else IAPC_VGA_NOT_PRESENT
    flags |= 0 if cmos_rtc else IAPC_CMOS_RTC_NOT_PRESENT
    return flags


def build_fadt(dsdt_address: int, *, boot_arch: int | None = None, century: int = 0) -> bytes:
    """A hardware-reduced FADT revision 6.5 (276 bytes). `century`: the CMOS index of the RTC's
    century register (0: none); Linux's RTC code reads and writes the century there."""
    if not 0 <= century < 0x80:
        raise AcpiError(f"RTC century index {century:#x} is not a CMOS register (0-0x7f)")
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    # FIRMWARE_CTRL/X_FIRMWARE_CTRL stay 0: a FACS is optional on hardware-reduced platforms.
    # The 32-bit DSDT field stays 0 so ACPICA does not compare it with X_DSDT.
    # SCI_INT, SMI_CMD, PM blocks, PM timer, GPE blocks: all 0 (none in hardware-reduced ACPI).
    put(FADT_CENTURY, "<B", century)
    put(FADT_IAPC_BOOT_ARCH, "<H", iapc_boot_arch() if boot_arch is None else boot_arch)
    put(FADT_FLAGS, "<I", FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP)
    put(FADT_RESET_REG, "12s", io_port_register(layout.ACPI_RESET_PORT))
    put(FADT_RESET_VALUE, "<B", layout.ACPI_RESET_VALUE)
    put(FADT_MINOR_VERSION, "<B", FADT_MINOR_REVISION)
    put(FADT_X_DSDT, "<Q", dsdt_address)
    put(FADT_SLEEP_CONTROL_REG, "12s", io_port_register(layout.ACPI_SLEEP_CONTROL_PORT))
    put(FADT_SLEEP_STATUS_REG, "12s", io_port_register(layout.ACPI_SLEEP_STATUS_PORT))
    put(FADT_HYPERVISOR_VENDOR_ID, "8s", HYPERVISOR_VENDOR_ID)
    return sdt(b"FACP", FADT_REVISION, bytes(body))


# --- MADT (5.2.12) ------------------------------------------------------------------------------

MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0      # dual 8259s are present (pyvmm / KVM's in-kernel PIC)
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_SOURCE_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENABLED = 1 << 0
LOCAL_APIC_ONLINE_CAPABLE = 1 << 1
MPS_INTI_CONFORMS = 0          # polarity and trigger "conform to the bus" (ISA: edge, active high)
ALL_PROCESSORS = 0xFF

# QEMU's value (ACPI_BUILD_IOAPIC_ID = 0), and the reset value of the ID register of KVM's
# in-kernel IOAPIC, so Linux finds the ID it reads equal to the MADT's. IOAPIC and local APIC
# IDs live in different name spaces since xAPIC (system-bus delivery), so 0 does not clash
# with the BSP's APIC ID; the MP-spec habit of "ID = number of CPUs" predates that.
IOAPIC_ID = 0
MAX_CPUS = 255                 # xAPIC IDs 0-254 (0xFF is broadcast); more would need x2APIC entries


def madt_local_apic(uid: int, apic_id: int, *, enabled: bool = True) -> bytes:
    """A disabled one is "online capable" (ACPI 6.3): a CPU that may be plugged in later."""
    flags = LOCAL_APIC_ENABLED if enabled else LOCAL_APIC_ONLINE_CAPABLE
    return struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, uid, apic_id, flags)


def madt_io_apic(ioapic_id: int, address: int, gsi_base: int) -> bytes:
    return struct.pack("<BBBxII", MADT_IO_APIC, 12, ioapic_id, address, gsi_base)


def madt_interrupt_source_override(source: int, gsi: int, flags: int = MPS_INTI_CONFORMS) -> bytes:
    return struct.pack("<BBBBIH", MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, source, gsi, flags)


def madt_local_apic_nmi(uid: int, lint: int, flags: int = MPS_INTI_CONFORMS) -> bytes:
    return struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, uid, flags, lint)


def build_madt(cpus: int, max_cpus: int | None = None) -> bytes:
    """One enabled local APIC per vCPU (ACPI UID = APIC ID = index), one IOAPIC at GSI 0,
    IRQ0 -> GSI2 (the PIT reaches IOAPIC pin 2, as layout.py wires it), LINT1 = NMI on all CPUs.
    No SCI override: a hardware-reduced platform has no SCI. `max_cpus`: vCPUs cpus..max_cpus-1
    are listed disabled and online capable, for CPU hotplug (cpu_hotplug.py)."""
    if not 1 <= cpus <= (max_cpus or cpus) <= MAX_CPUS:
        raise AcpiError(f"the MADT describes 1-{MAX_CPUS} CPUs, got {cpus} (at most {max_cpus})")
    entries = [madt_local_apic(i, i) for i in range(cpus)]
    entries += [madt_local_apic(i, i, enabled=False) for i in range(cpus, max_cpus or cpus)]
    entries.append(madt_io_apic(IOAPIC_ID, layout.IOAPIC_BASE, 0))
    entries.append(madt_interrupt_source_override(0, 2))
    entries.append(madt_local_apic_nmi(ALL_PROCESSORS, 1))
    body = struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT) + b"".join(entries)
    return sdt(b"APIC", MADT_REVISION, body)


# --- MCFG (PCI Firmware spec 3.3, 4.1.2) ----------------------------------------------------------


@dataclass(frozen=True)
class PciEcam:
    """One PCI segment's ECAM window. `base` is the address of bus 0 of the segment (even when
    start_bus > 0); each bus takes 1 MiB."""
    base: int
    segment: int = 0
    start_bus: int = 0
    end_bus: int = 0

    def __post_init__(self) -> None:
        if self.base % (1 << 20) or not 0 <= self.base < 1 << 64:
            raise AcpiError(f"ECAM base {self.base:#x} must be 1 MiB aligned")
        if not 0 <= self.start_bus <= self.end_bus <= 255:
            raise AcpiError(f"bad PCI bus range {self.start_bus}-{self.end_bus}")
        if not 0 <= self.segment <= 0xFFFF:
            raise AcpiError(f"bad PCI segment {self.segment}")

    @property
    def window(self) -> tuple[int, int]:
        """(address, size) of the configuration space the guest will access (reserve it in e820)."""
        return self.base + (self.start_bus << 20), (self.end_bus - self.start_bus + 1) << 20


def build_mcfg(segments: Iterable[PciEcam]) -> bytes:
    entries = b"".join(
        struct.pack("<QHBB4x", s.base, s.segment, s.start_bus, s.end_bus) for s in segments
    )
    return sdt(b"MCFG", 1, bytes(8) + entries)


# --- DSDT -----------------------------------------------------------------------------------------

DSDT_REVISION = 2              # revision >= 2: 64-bit AML integers


@dataclass(frozen=True)
class AcpiDevice:
    """A Device() in \\_SB: _HID, _UID, _CRS and any further AML terms.

    `hid` is an EISA ID ("PNP0501", encoded with EISAID) or an ACPI ID string ("LNRO0005").
    `resources` are aml resource descriptors (aml.io, aml.memory32_fixed, aml.interrupt ...).
    """
    name: str
    hid: str
    uid: int | None = 0
    resources: tuple[bytes, ...] = ()
    extra: tuple[bytes, ...] = field(default=())

    def aml(self) -> bytes:
        is_eisa = len(self.hid) == 7 and self.hid[:3].isalpha() and self.hid[:3].isupper()
        terms = [aml.name("_HID", aml.eisa_id(self.hid) if is_eisa else aml.string(self.hid))]
        if self.uid is not None:
            terms.append(aml.name("_UID", self.uid))
        if self.resources:
            terms.append(aml.name("_CRS", aml.resource_template(self.resources)))
        terms.extend(self.extra)
        return aml.device(self.name, terms)


def com1_device() -> AcpiDevice:
    """COM1 as QEMU describes it (PNP0501, ports 0x3f8-0x3ff, IRQ 4).

    Linux's 8250 core registers the legacy ttyS0 at 0x3f8 first; when 8250_pnp binds this
    device, serial8250_register_8250_port() finds the port with the same iobase and replaces
    it in place, so there is still one ttyS0. The ACPI path matters here: in hardware-reduced
    mode Linux has no legacy PIC and does not map ISA IRQ numbers 1:1, so only this
    description gives ttyS0 a working interrupt (GSI 4, edge, active high).
    """
    return AcpiDevice(
        "COM1", "PNP0501", uid=1,
        resources=(aml.io(0x3F8, 0x3F8, 0x01, 0x08), aml.interrupt(4)),
        extra=(aml.name("_DDN", "COM1"),),
    )


def rtc_device(port: int = 0x70, irq: int = 8) -> AcpiDevice:
    """The CMOS RTC (PNP0B00: MC146818-compatible) on its two ports. Linux's rtc_cmos binds to
    it through PNP; as for COM1, only the ACPI description gives it a working IRQ 8 in
    hardware-reduced mode."""
    return AcpiDevice("RTC", "PNP0B00", uid=None, resources=(aml.io(port, port, 0x01, 0x02), aml.interrupt(irq)))


def pvpanic_device(port: int = 0x505) -> AcpiDevice:
    """QEMU's pvpanic (QEMU0001) on one I/O port; Linux's pvpanic driver binds to it."""
    return AcpiDevice("PEVT", "QEMU0001", uid=0, resources=(aml.io(port, port, 0x01, 0x01),))


def i8042_keyboard_device() -> AcpiDevice:
    """The i8042 keyboard port (PNP0303, ports 0x60 and 0x64, IRQ 1), not added by default: with
    it Linux's i8042 driver gets a mapped IRQ 1 and atkbd probes the keyboard; without it the
    driver's direct probe cannot get IRQ 1 in hardware-reduced mode and gives up quickly."""
    return AcpiDevice(
        "PS2K", "PNP0303", uid=None,
        resources=(aml.io(0x60, 0x60, 0x01, 0x01), aml.io(0x64, 0x64, 0x01, 0x01), aml.interrupt(1)),
    )


def virtio_mmio_device(index: int, base: int, size: int, gsi: int, *, edge: bool = True) -> AcpiDevice:
    """A virtio-mmio transport as Linux's virtio_mmio driver matches it in ACPI (LNRO0005).

    Edge-triggered by default: KVM irqfd injection pulses the line."""
    if not 0 <= index <= 0xFF:
        raise AcpiError(f"virtio-mmio device index {index} out of range 0-255")
    return AcpiDevice(
        f"VR{index:02X}", "LNRO0005", uid=index,
        resources=(aml.memory32_fixed(base, size), aml.interrupt(gsi, edge=edge)),
    )


DsdtItem = Union[AcpiDevice, bytes]


# --- PCI host bridge ---------------------------------------------------------------------------

PCI_CONF1_PORT = 0xCF8
# The bridge forwards every port but conf1's to the bus (legacy devices included, as on a PC).
PCI_IO_WINDOWS = ((0x0000, 0x0CF7), (0x0D00, 0xFFFF))


def prt_entry(slot: int, pin: int, gsi: int) -> bytes:
    """One static _PRT entry: Package(){0xSSSSFFFF (any function of slot S), pin 0-3, 0, GSI}.
    Source 0 means "GSI number in the last field"; Linux programs such GSIs level, active low."""
    if not 0 <= slot < 32 or not 0 <= pin < 4:
        raise AcpiError(f"_PRT entry for slot {slot} pin {pin} out of range")
    return aml.package([slot << 16 | 0xFFFF, pin, 0, gsi])


def pci_root_device(*, intx_routes: Iterable[tuple[int, int, int]], mmio32_window: tuple[int, int],
                    mmio64_window: tuple[int, int] | None = None, segment: int = 0,
                    bus_range: tuple[int, int] = (0, 0), uid: int = 0, name: str = "PCI0") -> AcpiDevice:
    """\\_SB.PCI0: a PCI Express root bridge (PNP0A08, compatible with PNP0A03) and its windows.

    _CRS: the bus numbers, the conf1 ports it consumes, the I/O it forwards (all but conf1),
    the 32-bit MMIO window and, when given, the 64-bit one. Windows are (base, size).
    `intx_routes` are (slot, pin 0-3, GSI) triples for the _PRT. No _OSC: Linux does without
    it (it then leaves ASPM and hotplug to "firmware", of which there is none)."""
    resources = [
        aml.word_bus_number(*bus_range),
        aml.io(PCI_CONF1_PORT, PCI_CONF1_PORT, 0x01, 0x08),
        *(aml.word_io(lo, hi) for lo, hi in PCI_IO_WINDOWS),
        aml.dword_memory(mmio32_window[0], mmio32_window[0] + mmio32_window[1] - 1),
    ]
    if mmio64_window is not None:
        resources.append(aml.qword_memory(mmio64_window[0], mmio64_window[0] + mmio64_window[1] - 1))
    routes = [prt_entry(*route) for route in intx_routes]
    return AcpiDevice(
        name, "PNP0A08", uid=uid, resources=tuple(resources),
        extra=(
            aml.name("_CID", aml.eisa_id("PNP0A03")),
            aml.name("_SEG", segment),
            aml.name("_BBN", bus_range[0]),
            aml.name("_PRT", aml.package(routes)),
        ),
    )


def pci_ecam_reservation(ecam: PciEcam, *, name: str = "ECAM", uid: int = 0) -> AcpiDevice:
    """A motherboard-resources device (PNP0C02) claiming the ECAM window: Linux uses MMCONFIG
    only where it finds it reserved (here or in e820), and the PNP system driver keeps other
    drivers off it."""
    base, size = ecam.window
    return AcpiDevice(name, "PNP0C02", uid=uid, resources=(aml.memory32_fixed(base, size),))


def pci_root_acpi(root) -> tuple[list[DsdtItem], PciEcam]:
    """The DSDT items and the MCFG entry describing a pci.PciRoot, for build_acpi_tables:

        items, ecam = pci_root_acpi(root)
        build_acpi_tables(memory, cpus=n, devices=[*others, *items], mcfg=ecam)
    """
    first_bus, last_bus = root.bus_range
    ecam = PciEcam(root.ecam_base - (first_bus << 20), segment=root.segment, start_bus=first_bus, end_bus=last_bus)
    bridge = pci_root_device(intx_routes=root.intx_routes(), mmio32_window=root.mmio32_window,
                             mmio64_window=root.mmio64_window, segment=root.segment, bus_range=root.bus_range)
    return [bridge, pci_ecam_reservation(ecam)], ecam


def build_dsdt(devices: Iterable[DsdtItem] = (), *, com1: bool = True, rtc: bool = False) -> bytes:
    """The DSDT: Scope(\\_SB){COM1, [RTC], devices...} and Name(\\_S5_, Package(){5, 5, 0, 0}).

    AcpiDevice items go into \\_SB; bytes items are AML terms appended at the root (for
    anything that needs its own Scope)."""
    sb_devices: list[bytes] = [com1_device().aml()] if com1 else []
    if rtc:
        sb_devices.append(rtc_device().aml())
    root_terms: list[bytes] = []
    for item in devices:
        if isinstance(item, AcpiDevice):
            sb_devices.append(item.aml())
        elif isinstance(item, (bytes, bytearray)):
            root_terms.append(bytes(item))
        else:
            raise AcpiError(f"DSDT items are AcpiDevice or AML bytes, got {type(item).__name__}")
    # At the root "_SB_" is "\\_SB_"; written without the prefix as iasl emits it, so the
    # disassembly recompiles to the same bytes (the unit tests check that).
    terms = []
    if sb_devices:
        terms.append(aml.scope("_SB_", sb_devices))
    # SLP_TYPa = SLP_TYPb = 5: the value the VMM recognises at ACPI_SLEEP_CONTROL_PORT.
    terms.append(aml.name("_S5_", aml.package([S5_SLP_TYP, S5_SLP_TYP, 0, 0])))
    terms.extend(root_terms)
    return sdt(b"DSDT", DSDT_REVISION, b"".join(terms))


# --- placement in guest memory ----------------------------------------------------------------------


def _align(value: int, alignment: int = TABLE_ALIGN) -> int:
    return (value + alignment - 1) & -alignment


def layout_acpi_tables(
    *,
    cpus: int,
    max_cpus: int | None = None,
    devices: Iterable[DsdtItem] = (),
    mcfg: PciEcam | Sequence[PciEcam] | None = None,
    com1: bool = True,
    cmos_rtc: bool = False,
    boot_arch: int | None = None,
    extra_tables: Sequence[bytes] = (),
    base: int = layout.ACPI_RSDP,
    limit: int = layout.ACPI_TABLES_END,
) -> list[tuple[int, bytes]]:
    """All tables as (guest address, bytes), RSDP first at `base`; raises AcpiError past `limit`.
    `cmos_rtc`: the DSDT describes the RTC and the FADT names its century register (the
    IAPC_BOOT_ARCH flags come from `boot_arch`, or from iapc_boot_arch(cmos_rtc=...)).
    `extra_tables`: more finished tables the XSDT lists (the SRAT and SLIT of a NUMA guest)."""
    dsdt = build_dsdt(devices, com1=com1, rtc=cmos_rtc)
    if boot_arch is None:
        boot_arch = iapc_boot_arch(cmos_rtc=cmos_rtc)
    others = [build_madt(cpus, max_cpus)]
    if mcfg is not None:
        others.append(build_mcfg([mcfg] if isinstance(mcfg, PciEcam) else mcfg))
    others.extend(extra_tables)

    xsdt_address = _align(base + RSDP_SIZE)
    xsdt_size = HEADER_SIZE + 8 * (1 + len(others))       # FADT + the others
    fadt_address = _align(xsdt_address + xsdt_size)
    dsdt_address = _align(fadt_address + FADT_SIZE)
    cursor = _align(dsdt_address + len(dsdt))
    other_addresses = []
    for table in others:
        other_addresses.append(cursor)
        cursor = _align(cursor + len(table))

    placed = [
        (base, build_rsdp(xsdt_address)),
        (xsdt_address, build_xsdt([fadt_address, *other_addresses])),
        (fadt_address, build_fadt(dsdt_address, boot_arch=boot_arch,
                                  century=CMOS_RTC_CENTURY if cmos_rtc else 0)),
        (dsdt_address, dsdt),
        *zip(other_addresses, others),
    ]
    end = max(address + len(data) for address, data in placed)
    if end > limit:
        raise AcpiError(f"ACPI tables need {end - base:#x} bytes; only {limit - base:#x} fit at {base:#x}")
    return placed


def build_acpi_tables(
    memory,
    *,
    cpus: int,
    max_cpus: int | None = None,
    devices: Iterable[DsdtItem] = (),
    mcfg: PciEcam | Sequence[PciEcam] | None = None,
    com1: bool = True,
    i8042: bool = True,
    vga: bool = False,
    cmos_rtc: bool = False,
    extra_tables: Sequence[bytes] = (),
) -> int:
    """Write the ACPI tables into guest memory (in [ACPI_TABLES_START, ACPI_TABLES_END),
    reported reserved in e820); returns the RSDP address for boot_params / PVH start info.
    `cmos_rtc`: an MC146818 RTC sits at ports 0x70-0x71, IRQ 8 (DSDT device, FADT century
    register, IAPC_BOOT_ARCH without CMOS_RTC_NOT_PRESENT)."""
    placed = layout_acpi_tables(
        cpus=cpus, max_cpus=max_cpus, devices=devices, mcfg=mcfg, com1=com1, cmos_rtc=cmos_rtc,
        boot_arch=iapc_boot_arch(i8042=i8042, vga=vga, cmos_rtc=cmos_rtc), extra_tables=extra_tables,
    )
    for address, data in placed:
        memory.write(address, data)
    rsdp = placed[0][0]
    log.debug("ACPI tables at %#x-%#x: %s", rsdp, max(a + len(d) for a, d in placed),
              ", ".join(f"{d[:4].decode()}@{a:#x}+{len(d)}" for a, d in placed))
    return rsdp
