"""ACPI PCI hotplug on the root bus: the slot objects Linux's acpiphp drives, in the DSDT.

acpiphp (built into the Debian cloud kernel) registers a hotplug slot for every device
object under the root bridge that has an _ADR and an _EJ0, and installs a notify handler
on it: Notify 1 (bus check) scans the slot and adds what it finds (BARs assigned from the
bridge's _CRS windows, driver bound: no manual rescan), Notify 3 (eject request) removes
the PCI device and then evaluates _EJ0. The register block is
devices/legacy/pci_hotplug.py's:

    Scope (\\_SB.PCI0) {
        OperationRegion (PCHP, SystemIO, PORT, 12)
        Field (PCHP, DWordAcc, NoLock, Preserve) { PCIU, 32, PCID, 32, PCEJ, 32 }
        Method (PCNT, 0, Serialized) {              // called by \\_SB.GED._EVT (ged.py)
            Local0 = PCIU   Local1 = PCID
            If ((Local0 & 0x02) == 0x02) { Notify (S01, 1) }  ...   // each slot 1-31
            If ((Local1 & 0x02) == 0x02) { Notify (S01, 3) }  ...
        }
        Device (S01) { Name (_ADR, 0x00010000)  Name (_SUN, 1)  Method (_EJ0, 1) { PCEJ = 0x02 } }
        ...
    }

No _STA: acpiphp then reads the slot's vendor ID to see whether it is occupied, so the same
objects serve slots filled at boot (their devices can be unplugged too) and empty ones.
"""

from __future__ import annotations

from . import aml

ROOT_PATH = "\\_SB.PCI0"
SCAN_METHOD = f"{ROOT_PATH}.PCNT"
NOTIFY_BUS_CHECK = 1
NOTIFY_EJECT_REQUEST = 3
REGISTERS_LENGTH = 12


def slot_name(slot: int) -> str:
    return f"S{slot:02X}"


def slot_device(slot: int) -> bytes:
    bit = 1 << slot
    return aml.device(slot_name(slot), [
        aml.name("_ADR", slot << 16),
        aml.name("_SUN", slot),
        aml.method("_EJ0", 1, [aml.store(bit, aml.reference("PCEJ"))]),
    ])


def pci_hotplug_scope(port: int, slots: range) -> bytes:
    """The Scope(\\_SB.PCI0) above for root-bus `slots` (1-31), registers at I/O `port`;
    a DSDT item (bytes go at the root, after \\_SB where PCI0 is declared)."""
    if not slots or slots.start < 1 or slots.stop > 32:
        raise ValueError(f"hot-pluggable PCI slots must be within 1-31, got {slots}")
    scan = [aml.store(aml.reference("PCIU"), aml.local(0)), aml.store(aml.reference("PCID"), aml.local(1))]
    for local, value in ((0, NOTIFY_BUS_CHECK), (1, NOTIFY_EJECT_REQUEST)):
        scan += [aml.if_(aml.lequal(aml.and_(aml.local(local), 1 << slot), 1 << slot),
                         [aml.notify(slot_name(slot), value)]) for slot in slots]
    return aml.scope(ROOT_PATH, [
        aml.operation_region("PCHP", aml.REGION_SYSTEM_IO, port, REGISTERS_LENGTH),
        aml.field("PCHP", [("PCIU", 32), ("PCID", 32), ("PCEJ", 32)], access=aml.ACCESS_DWORD),
        aml.method("PCNT", 0, scan, serialized=True),
        *(slot_device(slot) for slot in slots),
    ])
