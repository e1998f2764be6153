"""The KVM vCPU's hot loop: enter the guest and serve its single port-I/O and MMIO accesses
until it exits for anything else. Compiled with the hot modules (pyvmm/compiled.py): a port
write goes from KVM_RUN's return to the device's handler with no Python frame.

Each access goes straight from the kvm_run page to the device: the exit's fields in one
unpack, the handler from the bus's per-address table (bus.writer / reader), no exit object.
"""

from __future__ import annotations

import mmap
import struct
from typing import Final

from ...bus import Bus
from ...kvm import uapi
from ...kvm.run import KvmRun

EXIT_IO: Final = uapi.KVM_EXIT_IO
EXIT_MMIO: Final = uapi.KVM_EXIT_MMIO
IO_OUT: Final = uapi.KVM_EXIT_IO_OUT
# kvm_run's exit union, read with one unpack per exit (a ctypes field read costs about as much
# as the whole unpack): io is direction, size, port, count, data_offset; mmio is phys_addr,
# data[8], len, is_write.
EXIT_FIELDS: Final = uapi.kvm_run.exit.offset
IO_FIELDS: Final = struct.Struct("<BBHIQ")
MMIO_FIELDS: Final = struct.Struct("<Q8sIB")
MMIO_DATA_SIZE: Final = 8
MMIO_DATA: Final = EXIT_FIELDS + uapi.kvm_run_mmio.data.offset  # where a read's answer goes


def serve_io_exits(run: KvmRun, page: mmap.mmap, pio: Bus, mmio: Bus) -> int:
    """Run the guest until an exit that is not a single port access or an MMIO access, and
    return its reason: EXIT_IO for a string (rep ins/outs) access, still undecoded in the
    page. Never looks at a stop request: whoever stops or pauses the VM kicks its vCPUs,
    which makes KVM_RUN return RUN_INTERRUPTED."""
    io_fields, mmio_fields = IO_FIELDS.unpack_from, MMIO_FIELDS.unpack_from
    while True:
        reason = run.enter()
        if reason == EXIT_IO:
            direction, size, port, count, offset = io_fields(page, EXIT_FIELDS)
            if count != 1:
                return reason
            if direction == IO_OUT:
                (pio.writers.get(port) or pio.writer(port))(page[offset:offset + size])
            else:
                data = (pio.readers.get(port) or pio.reader(port))(size)[:size]
                page[offset:offset + len(data)] = data
        elif reason == EXIT_MMIO:
            address, value, length, is_write = mmio_fields(page, EXIT_FIELDS)
            if is_write:
                (mmio.writers.get(address) or mmio.writer(address))(value[:length])
            else:  # (MmioRead.complete's rule: at most the 8 bytes kvm_run holds)
                data = (mmio.readers.get(address) or mmio.reader(address))(length)[:MMIO_DATA_SIZE]
                page[MMIO_DATA:MMIO_DATA + len(data)] = data
        else:
            return reason
