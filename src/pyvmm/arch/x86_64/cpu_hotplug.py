"""ACPI CPU hotplug: a processor device per possible vCPU, in the DSDT, for Linux's ACPI
processor scan handler (acpi_processor_add / acpi_processor_remove, built into the Debian
cloud kernel with CONFIG_ACPI_HOTPLUG_CPU).

The MADT lists every possible vCPU, those absent at boot disabled and "online capable"
(acpi.build_madt(max_cpus=...)): Linux counts them as hotplug CPUs. Each processor's _STA
asks the controller (devices/legacy/cpu_hotplug.py) whether it is present; its _MAT is its
MADT entry, enabled, which Linux reads to map the ACPI ID to an APIC ID when it appears:

    Device (\\_SB.CPUS) {
        Name (_HID, "ACPI0010")  Name (_CID, EisaId ("PNP0A05"))      // processor container
        OperationRegion (CPHP, SystemIO, PORT, 16)
        Field (CPHP, DWordAcc, NoLock, Preserve) { CSEL, 32, CSTA, 32, CEVT, 32, CEJ, 32 }
        Method (CACC, 2, Serialized) {      // Arg0: 0 status, 1 events, 2 eject; Arg1: vCPU
            CSEL = Arg1
            If (Arg0 == 0) { Return (CSTA) }
            If (Arg0 == 1) { Return (CEVT) }
            CEJ = 1  Return (0)
        }
        Method (CSCN, 0, Serialized) {      // called by \\_SB.GED._EVT
            Local0 = CACC (1, 1)  If ((Local0 & 1) == 1) { Notify (C001, 1) }
                                  If ((Local0 & 2) == 2) { Notify (C001, 3) }  ...
        }
        Device (C000) { Name (_HID, "ACPI0007")  Name (_UID, 0)
                        Method (_STA) { If (CACC (0, 0) == 1) { Return (0x0F) }  Return (0) }
                        Name (_MAT, Buffer () { 0, 8, 0, 0, 1, 0, 0, 0 }) }
        Device (C001) { ...  Method (_EJ0, 1) { CACC (2, 1) } }       // not the boot CPU's
        ...
    }

One method touches the registers, serialized: a selection and the access after it cannot
interleave with another's.
"""

from __future__ import annotations

import struct

from . import aml
from .acpi import AcpiDevice

CONTAINER_PATH = "\\_SB.CPUS"
SCAN_METHOD = f"{CONTAINER_PATH}.CSCN"
STATUS, EVENTS, EJECT = 0, 1, 2
NOTIFY_DEVICE_CHECK = 1
NOTIFY_EJECT_REQUEST = 3
REGISTERS_LENGTH = 16
MADT_LOCAL_APIC = 0


def processor_name(index: int) -> str:
    return f"C{index:03X}"


def _access(op: int, index: int) -> bytes:
    return aml.name_string("CACC") + aml.integer(op) + aml.integer(index)


def processor_device(index: int) -> bytes:
    present = aml.if_(aml.lequal(_access(STATUS, index), 1), [aml.return_(0x0F)])
    mat = struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, index, index, 1)   # enabled
    terms = [aml.name("_HID", aml.string("ACPI0007")), aml.name("_UID", index),
             aml.method("_STA", 0, [present, aml.return_(0)]), aml.name("_MAT", aml.buffer(mat))]
    if index != 0:
        terms.append(aml.method("_EJ0", 1, [_access(EJECT, index)]))
    return aml.device(processor_name(index), terms)


def cpu_hotplug_container(port: int, max_cpus: int) -> AcpiDevice:
    """\\_SB.CPUS above for vCPUs 0..max_cpus-1, registers at I/O `port` (a DSDT item)."""
    if not 1 <= max_cpus <= 255:
        raise ValueError(f"CPU hotplug covers 1-255 vCPUs, got {max_cpus}")
    access = aml.method("CACC", 2, [
        aml.store(aml.arg(1), aml.reference("CSEL")),
        aml.if_(aml.lequal(aml.arg(0), STATUS), [aml.return_(aml.reference("CSTA"))]),
        aml.if_(aml.lequal(aml.arg(0), EVENTS), [aml.return_(aml.reference("CEVT"))]),
        aml.store(1, aml.reference("CEJ")),
        aml.return_(0),
    ], serialized=True)
    scan = []
    for index in range(1, max_cpus):   # the boot CPU is never plugged in nor out
        scan.append(aml.store(_access(EVENTS, index), aml.local(0)))
        for bit, value in ((1, NOTIFY_DEVICE_CHECK), (2, NOTIFY_EJECT_REQUEST)):
            scan.append(aml.if_(aml.lequal(aml.and_(aml.local(0), bit), bit),
                                [aml.notify(processor_name(index), value)]))
    return AcpiDevice("CPUS", "ACPI0010", uid=None, extra=(
        aml.name("_CID", aml.eisa_id("PNP0A05")),
        aml.operation_region("CPHP", aml.REGION_SYSTEM_IO, port, REGISTERS_LENGTH),
        aml.field("CPHP", [("CSEL", 32), ("CSTA", 32), ("CEVT", 32), ("CEJ", 32)], access=aml.ACCESS_DWORD),
        access,
        aml.method("CSCN", 0, scan, serialized=True),
        *(processor_device(index) for index in range(max_cpus)),
    ))
