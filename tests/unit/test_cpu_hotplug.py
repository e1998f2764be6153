"""ACPI CPU hotplug: the controller's registers (devices/legacy/cpu_hotplug.py), the MADT's
online-capable entries, the processor devices (arch/x86_64/cpu_hotplug.py) run by ACPICA's
interpreter, and hotplug.set_vcpus on a software-CPU VM whose guest never ejects (the refusals,
one line each, the VM unchanged)."""

import re
import struct

import pytest

from helpers.state import through_json
from pyvmm.accel.select import choose_accelerator
from pyvmm.arch.x86_64 import acpi, aml, ged, layout
from pyvmm.arch.x86_64.cpu_hotplug import SCAN_METHOD, cpu_hotplug_container
from pyvmm.builder import CPU_HOTPLUG_ID, build_vm
from pyvmm.config import ConfigError, MachineConfig
from pyvmm.devices.legacy.cpu_hotplug import (EJECT, EVENT_INSERT, EVENT_REMOVE, EVENTS, SELECT, STATUS,
                                              CpuHotplugController)
from pyvmm.devices.legacy.ged import EVENT_CPU_HOTPLUG
from pyvmm.hotplug import HotplugError, set_vcpus
from test_ged import run_acpiexec

PORT = layout.CPU_HOTPLUG_PORT


def access(device, index, offset):
    device.write(SELECT, index.to_bytes(4, "little"))
    return int.from_bytes(device.read(offset, 4), "little")


def test_the_controller_reports_presence_events_and_ejects():
    raised = []
    device = CpuHotplugController(2, lambda: raised.append(1))
    assert [access(device, i, STATUS) for i in range(3)] == [1, 1, 0]
    device.inserted(2)
    assert raised == [1] and access(device, 2, STATUS) == 1
    assert access(device, 2, EVENTS) == EVENT_INSERT and access(device, 2, EVENTS) == 0   # reading clears
    device.request_eject(2)
    assert access(device, 2, EVENTS) == EVENT_REMOVE and not device.wait_ejected(2, 0)
    device.write(SELECT, (2).to_bytes(4, "little"))
    device.write(EJECT, b"\x01\0\0\0")
    assert device.wait_ejected(2, 0) and access(device, 2, STATUS) == 0
    device.write(SELECT, b"\0\0\0\0")
    device.write(EJECT, b"\x01\0\0\0")         # the boot CPU is never ejected
    assert access(device, 0, STATUS) == 1
    fresh = CpuHotplugController(1, lambda: None)
    fresh.restore(through_json(device.save()))
    assert [access(fresh, i, STATUS) for i in range(3)] == [1, 1, 0]


def test_the_madt_lists_absent_cpus_disabled_and_online_capable():
    madt = acpi.build_madt(2, 4)
    entries = [madt[i:i + 8] for i in range(44, len(madt)) if madt[i] == 0 and madt[i + 1] == 8][:4]
    assert [struct.unpack("<BBBBI", e)[2:] for e in entries] == [(0, 0, 1), (1, 1, 1), (2, 2, 2), (3, 3, 2)]
    with pytest.raises(acpi.AcpiError):
        acpi.build_madt(3, 2)


def dsdt(*extra: bytes) -> dict[bytes, bytes]:
    items = [*ged.ged_items(layout.GED_PORT, layout.GED_GSI, layout.VMGENID_ADDRESS,
                            calls=((EVENT_CPU_HOTPLUG, SCAN_METHOD),)), cpu_hotplug_container(PORT, 3), *extra]
    return {data[:4]: data for _, data in acpi.layout_acpi_tables(cpus=1, max_cpus=3, devices=items)[1:]}


def test_acpiexec_scans_the_cpus_and_notifies_each_by_its_events(tmp_path):
    """acpiexec backs the SystemIO region with memory: CEVT reads what the test stored, for every
    CPU alike; so each non-boot processor is notified of both events."""
    setup = aml.method("\\TEVT", 0, [
        aml.store(EVENT_INSERT | EVENT_REMOVE, aml.reference("\\_SB_.CPUS.CEVT")),
        aml.store(EVENT_CPU_HOTPLUG, aml.reference("\\_SB_.GED_.GDAT")),
        aml.name_string("\\_SB_.GED_._EVT") + aml.integer(layout.GED_GSI),
    ])
    output = run_acpiexec(dsdt(setup), "evaluate \\TEVT", tmp_path)
    assert not re.search(r"ACPI (Error|Exception)|AE_", output), output
    notify = re.findall(r"Received a \w+ Notify on \[(\w+)\].*Value (0x[0-9A-Fa-f]+)", output)
    assert sorted(notify) == [("C001", "0x01"), ("C001", "0x03"), ("C002", "0x01"), ("C002", "0x03")], output


def test_acpiexec_reads_a_processors_status_and_matrix(tmp_path):
    setup = aml.method("\\TSTA", 0, [aml.store(1, aml.reference("\\_SB_.CPUS.CSTA")),
                                     aml.return_(aml.name_string("\\_SB_.CPUS.C002._STA"))])
    output = run_acpiexec(dsdt(setup), "evaluate \\TSTA", tmp_path)
    assert re.search(r"Evaluation of \\TSTA returned object.*\n.*\[Integer\] = 0+F", output), output
    # _MAT: the processor's MADT entry, enabled (acpiexec does not print a buffer's bytes)
    assert aml.name("_MAT", aml.buffer(bytes([0, 8, 2, 2, 1, 0, 0, 0]))) in dsdt()[b"DSDT"]


@pytest.fixture
def vm(tmp_path):
    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")  # cli; hlt
    machine = build_vm(MachineConfig(kernel=str(kernel), flat_address=0x100000, memory=16 << 20, cpus=1, max_cpus=2),
                       lambda data: None, accel=choose_accelerator("tcg").create())
    yield machine
    machine.close()


def test_set_vcpus_adds_a_vcpu_and_refuses_what_it_cannot_do(vm):
    set_vcpus(vm, 2)
    assert len(vm.vcpus) == 2 and vm.machine.cpus == 2 and len(vm.accel.vcpus) == 2
    assert access(vm.devices[CPU_HOTPLUG_ID], 1, STATUS) == 1
    for count, message in ((3, r"^3 vCPUs: this VM can have 1 to 2 \(its maximum\)$"),
                           (0, r"^0 vCPUs: .*the boot CPU cannot be removed"),
                           (1, r"^the guest has not released vCPU 1 within 0.2 s")):
        with pytest.raises(HotplugError, match=message):
            set_vcpus(vm, count, timeout=0.2)
        assert len(vm.vcpus) == 2 and vm.machine.cpus == 2


def test_a_vm_without_a_maximum_cannot_change_and_the_maximum_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="max_cpus"):
        MachineConfig(cpus=2, max_cpus=1).validate()
    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")
    vm = build_vm(MachineConfig(kernel=str(kernel), flat_address=0x100000, memory=16 << 20),
                  lambda data: None, accel=choose_accelerator("tcg").create())
    try:
        assert CPU_HOTPLUG_ID not in vm.devices
        with pytest.raises(HotplugError, match="start it with a maximum"):
            set_vcpus(vm, 2)
    finally:
        vm.close()
