"""The VM Generation ID (Microsoft's "Virtual Machine Generation ID" spec, which Linux's
drivers/virt/vmgenid.c implements): a 128-bit ID in guest memory that changes whenever the
VM may have been duplicated - a restore from a snapshot, a clone - so that the guest can
reseed its random pool and forget anything it must not share with a twin.

    Device (\\_SB.VGEN) {
        Name (_HID, "VMGENCTR")  Name (_CID, "VM_GEN_COUNTER")  Name (_DDN, "VM_Gen_Counter")
        Method (ADDR, 0) { Return (Package () { low 32 bits, high 32 bits }) }   // of the ID
    }

The ID lives at layout.VMGENID_ADDRESS (reserved in e820). The VMM writes a new one there and
raises the Generic Event Device's VM-generation event; _EVT does Notify(VGEN, 0x80), on which
Linux's driver reads the new ID and, when it differs, reseeds the CRNG from it
(add_vmfork_randomness: "crng reseeded due to virtual machine fork").

Linux binds "VMGENCTR" and "VM_GEN_COUNTER" (CONFIG_VMGENID, Linux 5.18+). Debian 12's cloud
kernel, the default guest's, is built without it (CONFIG_VIRT_DRIVERS unset): there the guest
agent's identity request reseeds the pool instead (agent/protocol.py IDENTITY).
"""

from __future__ import annotations

import os

from . import aml
from .acpi import AcpiDevice

VMGENID_HID = "VMGENCTR"
VMGENID_CID = "VM_GEN_COUNTER"
VMGENID_PATH = "VGEN"
NOTIFY_GENERATION_CHANGED = 0x80
ID_SIZE = 16


def vmgenid_device(address: int) -> AcpiDevice:
    """\\_SB.VGEN: the generation ID's device, its ADDR method giving `address`."""
    if address % 8 or not 0 < address < 1 << 64:
        raise ValueError(f"VM generation ID address {address:#x} must be 8-byte aligned")
    addr = aml.method("ADDR", 0, [aml.return_(aml.package([address & 0xFFFFFFFF, address >> 32]))])
    return AcpiDevice(VMGENID_PATH, VMGENID_HID, uid=None, extra=(
        aml.name("_CID", VMGENID_CID), aml.name("_DDN", "VM_Gen_Counter"), addr))


def new_generation_id() -> bytes:
    """A fresh random generation ID."""
    return os.urandom(ID_SIZE)


def write_generation_id(memory, address: int, generation_id: bytes | None = None) -> bytes:
    """Put `generation_id` (default: a fresh one) at `address` in guest memory; returns it."""
    value = new_generation_id() if generation_id is None else generation_id
    if len(value) != ID_SIZE:
        raise ValueError(f"a VM generation ID has {ID_SIZE} bytes, not {len(value)}")
    memory.write(address, value)
    return value


def read_generation_id(memory, address: int) -> bytes:
    return bytes(memory.read(address, ID_SIZE))
