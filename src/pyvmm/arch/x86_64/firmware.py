"""The little pyvmm does in place of firmware: what sits at the reset vector.

There is no BIOS in a pyvmm guest, but kernels still jump to the reset vector
(F000:FFF0) to reboot: Linux does when ACPI is hardware-reduced (it first tries an
EFI reboot, then falls back to the BIOS path, machine_real_restart). A real machine
would run its firmware and reboot; pyvmm's reset vector writes the FADT's reset
register, so that every such path ends in a clean, reported reset.
"""

from __future__ import annotations

from . import layout

RESET_VECTOR = 0xFFFF0  # F000:FFF0, where a CPU starts after reset


def reset_vector_stub() -> bytes:
    """16-bit real-mode code: out ACPI_RESET_VALUE to ACPI_RESET_PORT, then halt."""
    port, value = layout.ACPI_RESET_PORT, layout.ACPI_RESET_VALUE
    code = bytes([0xBA, port & 0xFF, port >> 8,   # mov $port, %dx
                  0xB0, value,                    # mov $value, %al
                  0xEE,                           # out %al, %dx
                  0xFA, 0xF4,                     # cli; hlt
                  0xEB, 0xFD])                    # jmp back to hlt
    assert len(code) <= 16
    return code


def write_reset_vector(memory) -> None:
    memory.write(RESET_VECTOR, reset_vector_stub())
