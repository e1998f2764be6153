"""Small platform devices: ACPI power/reset registers, pvpanic, guest notifications, reset vector."""

from __future__ import annotations

from pyvmm.arch.x86_64 import layout
from pyvmm.arch.x86_64.firmware import RESET_VECTOR, reset_vector_stub, write_reset_vector
from pyvmm.devices.legacy import AcpiPower, GuestNotify, PvPanic
from pyvmm.memory import GuestMemory


def _power():
    events = []
    return AcpiPower(lambda: events.append("off"), lambda: events.append("reset"), layout.ACPI_RESET_VALUE), events


def test_s5_with_slp_en_powers_off_and_nothing_else_does():
    power, events = _power()
    power.write(1, b"\x80")          # Linux clears the wake status first
    power.write(0, b"\x14")          # SLP_TYP 5 without SLP_EN
    power.write(0, b"\x2c")          # SLP_EN with SLP_TYP 3 (S3): not supported, ignored
    assert events == []
    power.write(0, b"\x34")          # SLP_TYP 5 | SLP_EN: what Linux writes
    assert events == ["off"]


def test_reset_register_needs_the_fadt_value():
    power, events = _power()
    power.write(2, b"\x02")
    assert events == []
    power.write(2, bytes([layout.ACPI_RESET_VALUE]))
    assert events == ["reset"]
    assert power.read(1, 1) == b"\x00"


def test_pvpanic_reports_a_panic_only_for_the_panicked_bit():
    panics = []
    device = PvPanic(lambda: panics.append(1))
    device.write(0, b"\x02")         # crash kernel loaded: not a panic
    assert panics == []
    device.write(0, b"\x01")
    assert panics == [1]
    assert device.read(0, 1)[0] & 1


def test_guest_notify_records_init_once_and_the_command_status():
    starts = []
    notify = GuestNotify(lambda: starts.append(1))
    notify.write(0, b"\x01")
    first = notify.init_started_at
    notify.write(0, b"\x01")
    assert starts == [1] and notify.init_started_at == first
    notify.write(1, b"\x03")
    assert notify.command_status == 3


def test_reset_vector_writes_the_acpi_reset_register():
    code = reset_vector_stub()
    assert len(code) <= 16  # it must fit between F000:FFF0 and the end of the first MiB
    # mov $port,%dx ; mov $value,%al ; out %al,%dx
    assert code[:6] == bytes([0xBA, layout.ACPI_RESET_PORT & 0xFF, layout.ACPI_RESET_PORT >> 8,
                              0xB0, layout.ACPI_RESET_VALUE, 0xEE])
    with GuestMemory.from_specs(layout.ram_regions(2 << 20)) as memory:
        write_reset_vector(memory)
        assert memory.read(RESET_VECTOR, len(code)) == code
