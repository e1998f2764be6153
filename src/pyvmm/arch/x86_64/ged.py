"""The DSDT's Generic Event Device (ACPI 6.5, 5.6.9) and the power button it notifies.

A hardware-reduced platform has no GPE blocks and no fixed power button, so ACPI events
reach the guest through a GED (_HID ACPI0013): an interrupt in its _CRS, and an _EVT
method the OSPM runs when it fires (Linux: drivers/acpi/evged.c, Arg0 = the GSI). pyvmm's
_EVT reads the event register (devices/legacy/ged.py; reading clears it) and notifies the
device of each bit set:

    Device (\\_SB.GED) {
        Name (_HID, "ACPI0013")  Name (_UID, 0)
        Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {GSI} })
        OperationRegion (GDST, SystemIO, PORT, 4)
        Field (GDST, DWordAcc, NoLock, Preserve) { GDAT, 32 }
        Method (_EVT, 1, Serialized) {
            Local0 = GDAT
            If ((Local0 & 1) == 1) { Notify (PWRB, 0x80) }      // power button pressed
            If ((Local0 & 2) == 2) { Notify (VGEN, 0x80) }      // new VM generation ID
        }
    }
    Device (\\_SB.PWRB) { Name (_HID, EisaId ("PNP0C0C"))  Name (_UID, 0) }
    Device (\\_SB.VGEN) { ... }                                  // arch/x86_64/vmgenid.py

Linux's ACPI button driver (button.ko) binds PNP0C0C and turns Notify 0x80 into KEY_POWER
on its "Power Button" input device; the guest's userspace decides what to do with it.
"""

from __future__ import annotations

from . import aml
from .acpi import AcpiDevice
from .vmgenid import NOTIFY_GENERATION_CHANGED, VMGENID_PATH, vmgenid_device
from ...devices.legacy.ged import EVENT_POWER_BUTTON, EVENT_VM_GENERATION, PORT_COUNT

GED_HID = "ACPI0013"
POWER_BUTTON_HID = "PNP0C0C"
NOTIFY_BUTTON_PRESSED = 0x80   # 5.6.6: "S0 power button pressed" for a control method button
# Relative: a single NameSeg is searched for in the enclosing scopes, \_SB.GED then \_SB
# (iasl shortens the absolute path to this too).
POWER_BUTTON_PATH = "PWRB"


def power_button_device() -> AcpiDevice:
    """\\_SB.PWRB: a control-method power button."""
    return AcpiDevice("PWRB", POWER_BUTTON_HID, uid=0)


# Each event bit and the Notify _EVT sends for it (relative paths, searched as PWRB is).
NOTIFICATIONS = ((EVENT_POWER_BUTTON, POWER_BUTTON_PATH, NOTIFY_BUTTON_PRESSED),
                 (EVENT_VM_GENERATION, VMGENID_PATH, NOTIFY_GENERATION_CHANGED))


def ged_device(port: int, gsi: int, calls: tuple[tuple[int, str], ...] = ()) -> AcpiDevice:
    """\\_SB.GED: the event register at I/O `port` (4 bytes), interrupting on `gsi` (edge).
    `calls`: (event bit, method path) pairs; _EVT calls the method when the bit is set (the
    hotplug controllers' scan methods, which notify the slots or processors that changed)."""
    event_value = aml.store(aml.reference("GDAT"), aml.local(0))
    on_events = [aml.if_(aml.lequal(aml.and_(aml.local(0), bit), bit), [aml.notify(path, value)])
                 for bit, path, value in NOTIFICATIONS]
    on_events += [aml.if_(aml.lequal(aml.and_(aml.local(0), bit), bit), [aml.reference(method)])
                  for bit, method in calls]
    return AcpiDevice(
        "GED", GED_HID, uid=0, resources=(aml.interrupt(gsi, edge=True),),
        extra=(
            aml.operation_region("GDST", aml.REGION_SYSTEM_IO, port, PORT_COUNT),
            aml.field("GDST", [("GDAT", 8 * PORT_COUNT)], access=aml.ACCESS_DWORD),
            aml.method("_EVT", 1, [event_value, *on_events], serialized=True),
        ),
    )


def ged_items(port: int, gsi: int, vmgenid_address: int,
              calls: tuple[tuple[int, str], ...] = ()) -> list[AcpiDevice]:
    """The DSDT items for build_acpi_tables(devices=...): the GED and the devices it notifies,
    the power button and the VM generation ID (at `vmgenid_address` in guest memory).
    `calls`: see ged_device."""
    return [ged_device(port, gsi, calls), power_button_device(), vmgenid_device(vmgenid_address)]
