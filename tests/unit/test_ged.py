"""The ACPI power button: the AML the Generic Event Device needs (aml.py), its DSDT
description (arch/x86_64/ged.py) checked by ACPICA's iasl and acpiexec, and the event
register's device model (devices/legacy/ged.py)."""

import re

import pytest

from helpers.acpica import acpica_tool, disassemble_and_recompile, run
from helpers.state import through_json, tampered
from pyvmm.arch.x86_64 import acpi, aml, ged, layout, vmgenid
from pyvmm.devices.legacy.ged import EVENT_POWER_BUTTON, EVENT_VM_GENERATION, GedState, GenericEventDevice
from pyvmm.persist import StateError

# --- the AML encoder's method-body and region terms ------------------------------------------------


def test_arguments_and_locals():
    assert aml.arg(0) == b"\x68" and aml.arg(6) == b"\x6e"
    assert aml.local(0) == b"\x60" and aml.local(7) == b"\x67"
    for bad in (lambda: aml.arg(7), lambda: aml.local(8), lambda: aml.arg(-1)):
        with pytest.raises(aml.AmlError):
            bad()


def test_operators_encode_as_the_spec_says():
    assert aml.store(aml.reference("GDAT"), aml.local(0)) == b"\x70GDAT\x60"
    assert aml.and_(aml.local(0), 1) == b"\x7b\x60\x01\x00"          # NullName target
    assert aml.and_(aml.local(0), 0x80, aml.local(1)) == b"\x7b\x60\x0a\x80\x61"
    assert aml.lequal(aml.arg(0), 5) == b"\x93\x68\x0a\x05"
    assert aml.notify("\\_SB_.PWRB", 0x80) == b"\x86\\\x2e_SB_PWRB\x0a\x80"
    body = aml.notify("PWRB", 0x80)
    assert aml.if_(aml.lequal(1, 1), [body]) == bytes([0xA0, 1 + 3 + len(body)]) + b"\x93\x01\x01" + body


def test_operation_region_and_field():
    assert aml.operation_region("GDST", aml.REGION_SYSTEM_IO, 0x620, 4) == b"\x5b\x80GDST\x01\x0b\x20\x06\x0a\x04"
    # Field: ExtOp, PkgLength, region name, flags (DWordAcc=3 | Lock<<4 | update<<5), elements.
    assert aml.field("GDST", [("GDAT", 32)], access=aml.ACCESS_DWORD) == b"\x5b\x81\x0bGDST\x03GDAT\x20"
    encoded = aml.field("REGS", [("A", 8), ("", 8), ("B", 64), ("C", 4096)], lock=True,
                        update=aml.UPDATE_WRITE_AS_ZEROS)
    assert encoded[7] == 0x50
    # A field longer than 63 bits takes a two-byte length: low nibble, byte count 1 in bits 6-7.
    assert b"B___\x40\x04" in encoded and b"C___\x80\x00\x01" in encoded
    assert b"\x00\x08" in encoded  # the unnamed 8-bit gap
    with pytest.raises(aml.AmlError):
        aml.field("GDST", [("GDAT", 0)])
    with pytest.raises(aml.AmlError):
        aml.operation_region("GDST", 256, 0, 4)


# --- the GED and the power button in the DSDT, read by ACPICA -----------------------------------------


def dsdt_with_ged(*extra: bytes) -> dict[bytes, bytes]:
    placed = acpi.layout_acpi_tables(cpus=1, devices=[*ged.ged_items(layout.GED_PORT, layout.GED_GSI, layout.VMGENID_ADDRESS), *extra])
    return {data[:4]: data for _, data in placed[1:]}


def test_iasl_reads_the_ged_and_recompiles_it_identically(tmp_path):
    table = dsdt_with_ged()[b"DSDT"]
    expected = [
        'Device (GED)', 'Name (_HID, "ACPI0013" /* Generic Event Device */)',
        f"Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{layout.GED_GSI:08X}, }}",
        f"OperationRegion (GDST, SystemIO, 0x{layout.GED_PORT:04X}, 0x04)",
        "Field (GDST, DWordAcc, NoLock, Preserve) { GDAT, 32 }",
        "Method (_EVT, 1, Serialized)", "Local0 = GDAT", "If (((Local0 & One) == One))",
        "Notify (PWRB, 0x80)", "Device (PWRB)", 'EisaId ("PNP0C0C") /* Power Button Device */',
        "If (((Local0 & 0x02) == 0x02))", "Notify (VGEN, 0x80)",
        "Device (VGEN)", 'Name (_HID, "VMGENCTR")', 'Name (_CID, "VM_GEN_COUNTER")', 'Name (_DDN, "VM_Gen_Counter")',
        "Method (ADDR, 0, NotSerialized)", f"Return (Package (0x02) {{ 0x{layout.VMGENID_ADDRESS:08X}, Zero }})",
    ]
    # iasl wants an 8-character _HID to end in 4 hex digits; "VMGENCTR" is what Linux's vmgenid
    # driver matches (as other VMMs' non-hex IDs), and the OS does not check the form.
    recompiled = disassemble_and_recompile(table, b"DSDT", expected, tmp_path,
                                           allowed_errors=("_HID suffix must be all hex digits (NCTR)",))
    assert recompiled[36:] == table[36:]


def run_acpiexec(tables: dict[bytes, bytes], commands: str, tmp_path) -> str:
    files = []
    for signature in (b"DSDT", b"FACP", b"APIC"):
        path = tmp_path / f"{signature.decode().lower()}.dat"
        path.write_bytes(tables[signature])
        files.append(path.name)
    # 0x04000000 = ACPI_LV_IO: log every register access.
    return run([acpica_tool("acpiexec"), "-x", "0x04000000", "-b", commands, *files], tmp_path)


@pytest.mark.parametrize("register, notified", [(EVENT_POWER_BUTTON, ["PWRB"]), (0, []), (0b100, []),
                                                (EVENT_VM_GENERATION, ["VGEN"]),
                                                (EVENT_POWER_BUTTON | EVENT_VM_GENERATION, ["PWRB", "VGEN"])])
def test_acpiexec_runs_evt_and_notifies_the_power_button(register, notified, tmp_path):
    """ACPICA's interpreter (Linux's) runs _EVT as the GED driver does (Arg0 = the GSI): it
    reads the 32-bit register at the GED port and sends Notify(PWRB, 0x80) only when the
    power-button bit is set. acpiexec backs the SystemIO region with memory, so a test method
    puts the register's value there first. Bit 1 notifies the VM generation ID device alike."""
    setup = aml.method("\\TEVT", 0, [
        aml.store(register, aml.reference("\\_SB_.GED_.GDAT")),
        aml.name_string("\\_SB_.GED_._EVT") + aml.integer(layout.GED_GSI),   # _EVT (GSI)
    ])
    output = run_acpiexec(dsdt_with_ged(setup), "evaluate \\TEVT", tmp_path)
    assert not re.search(r"ACPI (Error|Exception)|AE_", output), output
    # The interpreter checks every port access it makes: the test's 4-byte write of the
    # register, then _EVT's 4-byte read.
    accesses = re.findall(rf"HwValidateIoRequest\s*: Address 0*{layout.GED_PORT:X} LastAddress "
                          rf"0*{layout.GED_PORT + 3:X} Length 4", output)
    assert len(accesses) == 2, output
    notify = re.findall(r"Received a \w+ Notify on \[(\w+)\].*Value (0x[0-9A-Fa-f]+)", output)
    assert sorted(notify) == [(name, "0x80") for name in notified], output  # delivered in any order


def test_acpiexec_reads_the_vm_generation_id_address_as_linux_does(tmp_path):
    """Linux's vmgenid driver evaluates ADDR and wants a package of two integers, the low and
    high 32 bits of the ID's guest-physical address."""
    address = 0x1_2345_6780
    placed = acpi.layout_acpi_tables(cpus=1, devices=ged.ged_items(layout.GED_PORT, layout.GED_GSI, address))
    output = run_acpiexec({data[:4]: data for _, data in placed[1:]}, "evaluate \\_SB_.VGEN.ADDR", tmp_path)
    assert not re.search(r"ACPI (Error|Exception)|AE_", output), output
    flat = re.sub(r"\s+", " ", output)
    assert re.search(r"\[Package\] Contains 2 Elements: \[Integer\] = 0*23456780 \[Integer\] = 0*1 ", flat), output
    with pytest.raises(ValueError):
        vmgenid.vmgenid_device(0x1004)


# --- the event register ---------------------------------------------------------------------------------


class CountingIrq:
    def __init__(self):
        self.edges = 0

    def trigger(self):
        self.edges += 1

    def set_level(self, high):
        raise AssertionError("the GED interrupt is edge-triggered")


def test_power_button_latches_the_event_and_pulses_the_interrupt():
    irq = CountingIrq()
    device = GenericEventDevice(irq)
    assert device.read(0, 4) == bytes(4) and irq.edges == 0
    device.press_power_button()
    device.press_power_button()
    assert irq.edges == 2
    assert device.read(0, 4) == EVENT_POWER_BUTTON.to_bytes(4, "little")
    assert device.read(0, 4) == bytes(4), "reading clears the register: one press is handled once"
    device.write(0, b"\xff\xff\xff\xff")
    assert device.read(0, 4) == bytes(4), "writes are ignored"
    device.press_power_button()
    assert device.read(0, 1) == b"\x01" and device.read(0, 4) == bytes(4)


def test_a_new_vm_generation_latches_its_event():
    irq = CountingIrq()
    device = GenericEventDevice(irq)
    device.new_vm_generation()
    device.press_power_button()
    assert irq.edges == 2 and device.read(0, 4) == bytes([EVENT_POWER_BUTTON | EVENT_VM_GENERATION, 0, 0, 0])


def test_unknown_events_are_refused():
    device = GenericEventDevice(CountingIrq())
    for bad in (0, 1 << 5, -1):
        with pytest.raises(ValueError):
            device.raise_event(bad)


def test_state_round_trip_redelivers_a_pending_press():
    irq = CountingIrq()
    device = GenericEventDevice(irq)
    device.press_power_button()
    state = through_json(device.save())
    assert state == GedState(pending=EVENT_POWER_BUTTON)
    fresh_irq = CountingIrq()
    fresh = GenericEventDevice(fresh_irq)
    fresh.restore(state)
    assert fresh_irq.edges == 1 and fresh.read(0, 4) == b"\x01\0\0\0"
    quiet = CountingIrq()
    GenericEventDevice(quiet).restore(GedState())
    assert quiet.edges == 0
    with pytest.raises(StateError, match="pending"):
        GedState.from_dict(tampered(state, pending=0x100))
