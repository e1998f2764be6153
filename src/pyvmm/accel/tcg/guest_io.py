"""Port I/O and MMIO of the vCPU the software CPU runs, as the engine's hooks hand them over.

Each access goes straight to its handler, as KVM's run loop serves single accesses (kvm/
native_run.c, accel/kvm/io_exits.py); the vCPU's own LAPIC page is answered here (KVM keeps it
in the kernel). A UART takes four accesses per console byte, where an exit object and the
dispatcher's frames were a fifth of the calls; a virtio kick (an MMIO write to a PCI BAR) took
four interpreted frames to reach the BAR before. The bus's per-address tables are read before
its reader()/writer(), which fill them.

Compiled with the devices behind it (pyvmm/compiled.py): direct_hooks.py calls these from the
engine's callbacks with no Python frame in between; TcgVcpu's methods of the same names call
them for the Unicorn binding's hooks.
"""

from __future__ import annotations

from typing import Protocol

from ...arch.x86_64.layout import LAPIC_BASE
from ...bus.bus import Bus
from ...platform.lapic import LocalApic


class RunningVcpu(Protocol):
    stats: dict[str, int]
    pio_bus: Bus
    mmio_bus: Bus
    lapic: LocalApic | None


def port_in(vcpu: RunningVcpu, port: int, size: int) -> int:
    vcpu.stats["port_io"] += 1
    bus = vcpu.pio_bus
    return int.from_bytes((bus.readers.get(port) or bus.reader(port))(size)[:size], "little")


def port_out(vcpu: RunningVcpu, port: int, size: int, value: int) -> None:
    vcpu.stats["port_io"] += 1
    bus = vcpu.pio_bus
    (bus.writers.get(port) or bus.writer(port))((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))


def mmio_read(vcpu: RunningVcpu, address: int, size: int) -> int:
    vcpu.stats["mmio"] += 1
    lapic = vcpu.lapic
    offset = address - LAPIC_BASE
    if lapic is not None and 0 <= offset < 0x1000:
        if size == 4 and not offset & 3:  # (how Linux accesses every xAPIC register)
            return lapic.read_dword(offset)
        return int.from_bytes(lapic.read(offset, size), "little")
    bus = vcpu.mmio_bus
    return int.from_bytes((bus.readers.get(address) or bus.reader(address))(size)[:size], "little")


def mmio_write(vcpu: RunningVcpu, address: int, size: int, value: int) -> None:
    vcpu.stats["mmio"] += 1
    value &= (1 << (8 * size)) - 1
    lapic = vcpu.lapic
    offset = address - LAPIC_BASE
    if lapic is not None and 0 <= offset < 0x1000:
        if size == 4 and not offset & 3:  # (the EOI after every interrupt, among others)
            lapic.write_dword(offset, value)
        else:
            lapic.write(offset, value.to_bytes(size, "little"))
    else:
        bus = vcpu.mmio_bus
        (bus.writers.get(address) or bus.writer(address))(value.to_bytes(size, "little"))
