"""The guest-physical address map of a pyvmm x86-64 machine, computed in one place.

    0x0000_0000 ... 0x0009_fbff   low RAM (real-mode area, pyvmm's boot structures)
    0x0009_fc00 ... 0x000f_ffff   EBDA / legacy ROM area: reported reserved; the VM generation
                                  ID at 0x9_fc00 (16 bytes), the ACPI tables from 0xe_0000
    0x0010_0000 ... LOW_RAM_END   RAM where kernels are loaded
    LOW_RAM_END ... 4 GiB         the 32-bit PCI/MMIO hole:
        0xC000_0000 ... 0xCFFF_FFFF   PCI 32-bit BAR window (the PCI root places BARs here)
        0xD000_0000 ... 0xDFFF_FFFF   platform MMIO devices outside PCI (virtio-mmio); tiny
                                      test guests use 0xD000_0000 as "nothing there"
        0xE000_0000 ... 0xE00F_FFFF   PCI ECAM, bus 0: reported reserved in e820 (always) and
                                      by an ACPI PNP0C02 device (Linux wants one or the other)
        0xFEC0_0000 IOAPIC, 0xFEE0_0000 LAPIC, 0xFFFB_C000 KVM's real-mode pages
    4 GiB       ... 4 GiB + rest  high RAM, when the guest has more than LOW_RAM_END
    above RAM, 1 GiB aligned      PCI 64-bit BAR window (pci_mmio64_window)

Port I/O: 0x60/0x64 i8042, 0x70-0x71 RTC, 0x80 POST, 0xF4 debug exit, 0x3F8 COM1, 0x505
pvpanic, 0x600-0x602 ACPI power, 0x610-0x611 guest notify, 0x620-0x623 GED, 0x630-0x63B PCI
hotplug, 0x640-0x64F CPU hotplug, 0xCF8-0xCFF PCI conf1; with --test-devices 0xE0-0xEB and
0x2000-0x200F the ISA test device, 0x510-0x511 fw_cfg;
0xC000-0xFFFF the PCI I/O BAR window. The device manager (devmgr) hands these out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ...memory.guest_memory import RegionSpec

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Boot structures pyvmm writes below 1 MiB (all in RAM of any size >= MIN_MEMORY).
BOOT_GDT = 0x0500             # 6 descriptors, up to 0x52f
BOOT_IDT = 0x0540
ZERO_PAGE = 0x7000            # Linux boot_params
BOOT_STACK_TOP = 0x8FF0
PML4 = 0x9000                 # identity page tables: PML4, PDPT, then 4 page directories
PDPT = 0xA000
PAGE_DIRECTORIES = 0xB000     # 4 x 4 KiB: 2 MiB pages covering 4 GiB
MULTIBOOT_INFO = 0x10000      # multiboot info, its memory map and module list (up to 0x1ffff)
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
# The VM generation ID (arch/x86_64/vmgenid.py): 16 bytes at the start of the EBDA area, which
# e820 reports reserved and nothing else uses (no BIOS here). 8-byte aligned, as the spec asks.
VMGENID_ADDRESS = EBDA_START
VMGENID_SIZE = 16
HIGH_MEMORY_START = 0x100000  # where protected-mode kernels load

LOW_RAM_END = 3 * GiB         # start of the 32-bit PCI hole
MMIO_HOLE_END = 4 * GiB
MMIO32_START = LOW_RAM_END    # device windows allocated from here
VIRTIO_MMIO_BASE = 0xD1000000    # virtio-mmio transports, one VIRTIO_MMIO_STRIDE window each
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_SLOTS = 10
# Edge-triggered ISA IRQs no legacy device uses here (GSIs 16-23 are PCI INTx, level-triggered);
# IRQ 3 (COM2's on a PC) is the Generic Event Device's, GED_GSI.
VIRTIO_MMIO_GSIS = (5, 6, 7, 9, 10, 11, 12, 13, 14, 15)
# (base, GSI) of each virtio-mmio slot, in the order the device manager hands them out.
VIRTIO_MMIO_SLOT_TABLE = tuple((VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_GSIS[i])
                               for i in range(VIRTIO_MMIO_SLOTS))
IOAPIC_BASE = 0xFEC00000
LAPIC_BASE: Final = 0xFEE00000
KVM_IDENTITY_MAP = 0xFFFBC000  # one page KVM needs on Intel hosts (real-mode emulation)
KVM_TSS = 0xFFFBD000           # three pages KVM needs for the TSS of real-mode emulation

# PCI (see pci/root.py). The 32-bit window stays clear of the ECAM and of 0xD000_0000 up;
# Linux clips e820-reserved ranges out of host bridge windows, so none may overlap them.
PCI_MMIO32_START = MMIO32_START
PCI_MMIO32_SIZE = 256 * MiB
PCI_ECAM_BASE = 0xE0000000
PCI_ECAM_SIZE = 1 * MiB       # bus 0 only
PCI_IO_START = 0xC000
PCI_IO_SIZE = 0x4000
PCI_MMIO64_ALIGN = 1 * GiB
PCI_MMIO64_SIZE = 64 * GiB
PCI_CONF1_PORT = 0xCF8        # CONFIG_ADDRESS and CONFIG_DATA
PCI_CONF1_PORT_COUNT = 8
PCI_DEVICE_SLOTS = range(1, 32)  # slot 0 is the host bridge

# ACPI tables live in the legacy BIOS area (reported reserved), where Linux also scans for the RSDP.
ACPI_TABLES_START = 0xE0000
ACPI_TABLES_END = 0x100000
ACPI_RSDP = ACPI_TABLES_START

# Linux boot structures (PVH start info / boot_params) share the zero page area.
PVH_START_INFO = 0x6000       # struct hvm_start_info, its memmap and module list (to 0x6fff)
KERNEL_LOAD_64 = 0x1000000    # default load address of a relocatable bzImage's protected-mode kernel (16 MiB)

# pyvmm's own port I/O platform registers (no legacy chipset behind them).
ACPI_SLEEP_CONTROL_PORT = 0x600   # FADT hardware-reduced SLEEP_CONTROL_REG: SLP_EN|SLP_TYP=5 -> power off
ACPI_SLEEP_STATUS_PORT = 0x601    # FADT SLEEP_STATUS_REG
ACPI_RESET_PORT = 0x602           # FADT RESET_REG: writing ACPI_RESET_VALUE resets the machine
ACPI_RESET_VALUE = 0x01
GUEST_NOTIFY_PORT = 0x610         # guest -> VMM events, one byte: 0x01 = init started (boot timer)
GUEST_STATUS_PORT = 0x611         # guest -> VMM: exit status (one byte) of the command run by init
GED_PORT = 0x620                  # the Generic Event Device's 32-bit event register (ACPI power button)
GED_PORT_COUNT = 4
GED_GSI = 3                       # its interrupt, edge-triggered
PCI_HOTPLUG_PORT = 0x630          # ACPI PCI hotplug registers (devices/legacy/pci_hotplug.py)
PCI_HOTPLUG_PORT_COUNT = 12
CPU_HOTPLUG_PORT = 0x640          # ACPI CPU hotplug registers (devices/legacy/cpu_hotplug.py)
CPU_HOTPLUG_PORT_COUNT = 16

# Legacy PC devices at their ISA addresses: (first port, port count), IRQ.
COM1_PORT, COM1_PORT_COUNT, COM1_IRQ = 0x3F8, 8, 4
I8042_DATA_PORT, I8042_COMMAND_PORT = 0x60, 0x64   # one port each
RTC_PORT, RTC_PORT_COUNT, RTC_IRQ = 0x70, 2, 8
POST_PORT = 0x80
DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_COUNT = 0xF4, 4   # QEMU's isa-debug-exit
PVPANIC_PORT = 0x505
# QEMU's test-kernel devices (MachineConfig.test_devices): pc-testdev's latch and IRQ windows, fw_cfg
TEST_DEVICE_PORT, TEST_DEVICE_PORT_COUNT = 0xE0, 12
TEST_DEVICE_IRQ_PORT, TEST_DEVICE_IRQ_PORT_COUNT = 0x2000, 16
FW_CFG_PORT, FW_CFG_PORT_COUNT = 0x510, 2
ACPI_POWER_PORT_COUNT = 3         # SLEEP_CONTROL, SLEEP_STATUS, RESET
GUEST_NOTIFY_PORT_COUNT = 2       # GUEST_NOTIFY_PORT, GUEST_STATUS_PORT

# Virtual-wire ISA interrupts: IRQ 0 (PIT) arrives at IOAPIC pin 2; the others at pin = IRQ.
IOAPIC_PINS = 24

MIN_MEMORY = 2 * MiB


@dataclass(frozen=True)
class E820Entry:
    address: int
    size: int
    kind: int  # 1 = usable RAM, 2 = reserved

    RAM = 1
    RESERVED = 2


def ram_regions(memory_size: int) -> list[RegionSpec]:
    """Split `memory_size` bytes of RAM around the 32-bit hole."""
    if memory_size < MIN_MEMORY:
        raise ValueError(f"guest memory must be at least {MIN_MEMORY >> 20} MiB, got {memory_size} bytes")
    if memory_size % (4 * KiB):
        raise ValueError("guest memory size must be a multiple of 4 KiB")
    low = min(memory_size, LOW_RAM_END)
    regions = [RegionSpec(0, low)]
    if memory_size > low:
        regions.append(RegionSpec(MMIO_HOLE_END, memory_size - low))
    return regions


def pci_mmio64_window(memory_size: int) -> tuple[int, int]:
    """(base, size) of the 64-bit PCI BAR window: above all RAM, 1 GiB aligned."""
    regions = ram_regions(memory_size)
    ram_end = max(MMIO_HOLE_END, max(r.guest_base + r.size for r in regions))
    base = (ram_end + PCI_MMIO64_ALIGN - 1) & -PCI_MMIO64_ALIGN
    return base, PCI_MMIO64_SIZE


def virtio_mem_region(memory_size: int, size: int) -> RegionSpec:
    """Where a virtio-mem device's memory sits: above the 64-bit PCI window, 1 GiB aligned (so
    that no PCI BAR and no RAM the guest boots with overlaps it). Not in the e820 map: the
    guest's virtio_mem driver finds it in the device's configuration."""
    base, window = pci_mmio64_window(memory_size)
    return RegionSpec(base + window, size)


def memory_specs(memory_size: int, virtio_mem_size: int = 0) -> list[RegionSpec]:
    """Every region of guest memory a machine maps: its RAM, and its virtio-mem region if any."""
    specs = ram_regions(memory_size)
    if virtio_mem_size:
        specs.append(virtio_mem_region(memory_size, virtio_mem_size))
    return specs


def e820_map(memory_size: int) -> list[E820Entry]:
    """The memory map a guest is told about (multiboot mmap, Linux e820)."""
    entries = [
        E820Entry(0, EBDA_START, E820Entry.RAM),
        E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820Entry.RESERVED),
    ]
    for region in ram_regions(memory_size):
        start = max(region.guest_base, HIGH_MEMORY_START)
        end = region.guest_base + region.size
        if end > start:
            entries.append(E820Entry(start, end - start, E820Entry.RAM))
    # Linux's early MMCONFIG check looks for the ECAM window among e820 reserved ranges.
    entries.append(E820Entry(PCI_ECAM_BASE, PCI_ECAM_SIZE, E820Entry.RESERVED))
    return sorted(entries, key=lambda e: e.address)
