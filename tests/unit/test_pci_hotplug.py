"""ACPI PCI hotplug: the controller's registers (devices/legacy/pci_hotplug.py) and the slot
objects in the DSDT (arch/x86_64/pci_hotplug.py) run by ACPICA's interpreter, as Linux runs
them: the GED's _EVT calls PCNT, which notifies each slot with a pending insert (1) or eject
request (3); a slot's _EJ0 writes its bit to the eject register."""

import re
import threading

import pytest

from helpers.acpica import disassemble_and_recompile
from helpers.state import through_json, tampered
from pyvmm.arch.x86_64 import acpi, aml, ged, layout
from pyvmm.arch.x86_64.pci_hotplug import SCAN_METHOD, pci_hotplug_scope
from pyvmm.devices.legacy.ged import EVENT_PCI_HOTPLUG
from pyvmm.devices.legacy.pci_hotplug import EJECTED, INSERTED, REMOVING, PciHotplugController, PciHotplugState
from pyvmm.persist import StateError
from test_ged import run_acpiexec

PORT = layout.PCI_HOTPLUG_PORT


def controller():
    raised = []
    return PciHotplugController(lambda: raised.append(1)), raised


def read32(device, offset):
    return int.from_bytes(device.read(offset, 4), "little")


def test_an_insert_is_latched_until_the_guest_reads_it():
    device, raised = controller()
    device.device_inserted(3)
    device.device_inserted(5)
    assert raised == [1, 1]
    assert read32(device, INSERTED) == 1 << 3 | 1 << 5
    assert read32(device, INSERTED) == 0              # reading clears
    assert read32(device, REMOVING) == 0


def test_an_eject_request_is_answered_by_the_guests_write():
    device, raised = controller()
    device.request_eject(4)
    assert read32(device, REMOVING) == 1 << 4 and read32(device, REMOVING) == 0
    assert not device.wait_ejected(4, 0.01)           # the guest has not ejected yet
    threading.Timer(0.05, device.write, (EJECTED, (1 << 4).to_bytes(4, "little"))).start()
    assert device.wait_ejected(4, 10)


def test_a_new_request_forgets_an_old_eject_and_bad_slots_are_refused():
    device, _ = controller()
    device.write(EJECTED, (1 << 6).to_bytes(4, "little"))
    device.request_eject(6)                            # an eject from before this request does not count
    assert not device.wait_ejected(6, 0)
    device.write(INSERTED, b"\xff\xff\xff\xff")       # read-only registers ignore writes
    for slot in (0, 32, -1):
        with pytest.raises(ValueError):
            device.device_inserted(slot)


def test_pending_requests_survive_a_save_and_are_raised_again():
    device, _ = controller()
    device.device_inserted(2)
    device.request_eject(7)
    state = through_json(device.save())
    fresh, raised = controller()
    fresh.restore(state)
    assert raised == [1]
    assert read32(fresh, INSERTED) == 1 << 2 and read32(fresh, REMOVING) == 1 << 7
    with pytest.raises(StateError, match="inserted"):
        PciHotplugState.from_dict(tampered(state, inserted=1))   # slot 0: the host bridge


def dsdt(*extra: bytes) -> dict[bytes, bytes]:
    root = acpi.pci_root_device(intx_routes=[], mmio32_window=(layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE))
    items = [*ged.ged_items(layout.GED_PORT, layout.GED_GSI, layout.VMGENID_ADDRESS,
                            calls=((EVENT_PCI_HOTPLUG, SCAN_METHOD),)), root,
             pci_hotplug_scope(PORT, layout.PCI_DEVICE_SLOTS), *extra]
    return {data[:4]: data for _, data in acpi.layout_acpi_tables(cpus=1, devices=items)[1:]}


def test_iasl_reads_the_slots(tmp_path):
    """(Not byte for byte: iasl shortens the absolute path of the GED's call to PCNT.)"""
    table = dsdt()[b"DSDT"]
    expected = ["Scope (\\_SB.PCI0)", f"OperationRegion (PCHP, SystemIO, 0x{PORT:04X}, 0x0C)",
                "Field (PCHP, DWordAcc, NoLock, Preserve) { PCIU, 32, PCID, 32, PCEJ, 32 }",
                "Method (PCNT, 0, Serialized)", "Local0 = PCIU", "Local1 = PCID",
                "If (((Local0 & 0x02) == 0x02))", "Notify (S01, One)", "Notify (S1F, 0x03)",
                "Device (S1F)", "Name (_ADR, 0x001F0000)", "Name (_SUN, 0x1F)", "Method (_EJ0, 1, NotSerialized)",
                "PCEJ = 0x80000000", "If (((Local0 & 0x04) == 0x04))", "\\_SB.PCI0.PCNT ()"]
    disassemble_and_recompile(table, b"DSDT", expected, tmp_path,
                              allowed_errors=("_HID suffix must be all hex digits (NCTR)",))


def test_acpiexec_notifies_the_slots_the_registers_name(tmp_path):
    setup = aml.method("\\TEVT", 0, [
        aml.store(1 << 3, aml.reference("\\_SB_.PCI0.PCIU")),
        aml.store(1 << 5 | 1 << 9, aml.reference("\\_SB_.PCI0.PCID")),
        aml.store(EVENT_PCI_HOTPLUG, aml.reference("\\_SB_.GED_.GDAT")),
        aml.name_string("\\_SB_.GED_._EVT") + aml.integer(layout.GED_GSI),
    ])
    output = run_acpiexec(dsdt(setup), "evaluate \\TEVT", tmp_path)
    assert not re.search(r"ACPI (Error|Exception)|AE_", output), output
    notify = re.findall(r"Received a \w+ Notify on \[(\w+)\].*Value (0x[0-9A-Fa-f]+)", output)
    assert sorted(notify) == [("S03_", "0x01"), ("S05_", "0x03"), ("S09_", "0x03")], output


def test_acpiexec_runs_a_slots_ej0_which_writes_its_bit(tmp_path):
    output = run_acpiexec(dsdt(), "evaluate \\_SB_.PCI0.S0A_._EJ0 1", tmp_path)
    assert not re.search(r"ACPI (Error|Exception)|AE_", output), output
    writes = re.findall(rf"HwValidateIoRequest\s*: Address 0*{PORT + EJECTED:X} LastAddress "
                        rf"0*{PORT + EJECTED + 3:X} Length 4", output)
    assert len(writes) == 1, output
