"""KVM's binary statistics (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst 4.130).

A VM or vCPU fd hands out a read-only stats fd laid out as: a header (kvm_stats_header) at
offset 0; at desc_offset, num_desc descriptors, each a kvm_stats_desc followed by a name of
header.name_size bytes (NUL-padded); at data_offset, the values: descriptor i's `size` u64
words start at data_offset + desc.offset. The header and descriptors do not change while the
fd is open, so they are read once; each sample is one pread of the data block.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from . import ioctls
from .errors import KvmError
from .fd import ioctl

KVM_CAP_BINARY_STATS_FD = 203

# desc.flags: the kind of value (bits 0-3), its unit (4-7), the base of its exponent (8-11)
STATS_TYPE_MASK, STATS_TYPE_CUMULATIVE, STATS_TYPE_INSTANT, STATS_TYPE_PEAK = 0xF, 0x0, 0x1, 0x2
STATS_TYPE_LINEAR_HIST, STATS_TYPE_LOG_HIST = 0x3, 0x4
STATS_UNIT_MASK = 0xF0
UNITS = {0x00: "", 0x10: "bytes", 0x20: "seconds", 0x30: "cycles", 0x40: "boolean"}


class kvm_stats_header(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("name_size", ctypes.c_uint32), ("num_desc", ctypes.c_uint32),
                ("id_offset", ctypes.c_uint32), ("desc_offset", ctypes.c_uint32), ("data_offset", ctypes.c_uint32)]


class kvm_stats_desc(ctypes.Structure):
    """The fixed part of a descriptor; its name (header.name_size bytes) follows it."""
    _fields_ = [("flags", ctypes.c_uint32), ("exponent", ctypes.c_int16), ("size", ctypes.c_uint16),
                ("offset", ctypes.c_uint32), ("bucket_size", ctypes.c_uint32)]


@dataclass(frozen=True)
class StatDescriptor:
    name: str
    kind: int          # STATS_TYPE_*
    unit: str          # '', bytes, seconds, cycles, boolean
    exponent: int      # value * base**exponent is in `unit` (e.g. -9: nanoseconds)
    offset: int        # from the data block's start, in bytes
    size: int          # number of u64 words (more than 1 for a histogram)


class StatsFd:
    """One VM's or vCPU's binary stats fd: `sample()` -> {name: value} (histograms: lists)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        header = kvm_stats_header.from_buffer_copy(_pread(fd, ctypes.sizeof(kvm_stats_header), 0))
        self.id = _pread(fd, header.name_size, header.id_offset).split(b"\0", 1)[0].decode(errors="replace")
        entry = ctypes.sizeof(kvm_stats_desc) + header.name_size
        block = _pread(fd, entry * header.num_desc, header.desc_offset)
        self.descriptors: list[StatDescriptor] = []
        for index in range(header.num_desc):
            raw = block[index * entry:(index + 1) * entry]
            desc = kvm_stats_desc.from_buffer_copy(raw)
            name = raw[ctypes.sizeof(kvm_stats_desc):].split(b"\0", 1)[0].decode(errors="replace")
            self.descriptors.append(StatDescriptor(name, desc.flags & STATS_TYPE_MASK,
                                                   UNITS.get(desc.flags & STATS_UNIT_MASK, "?"),
                                                   desc.exponent, desc.offset, desc.size))
        self.data_offset = header.data_offset
        self.data_size = max((d.offset + 8 * d.size for d in self.descriptors), default=0)

    def sample(self) -> dict[str, int | list[int]]:
        data = _pread(self.fd, self.data_size, self.data_offset)
        values: dict[str, int | list[int]] = {}
        for desc in self.descriptors:
            words = [int.from_bytes(data[desc.offset + 8 * i:desc.offset + 8 * i + 8], "little")
                     for i in range(desc.size)]
            values[desc.name] = words[0] if desc.size == 1 else words
        return values

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_stats(fd: int) -> StatsFd | None:
    """The stats of the VM or vCPU behind `fd`, or None where this KVM has no binary stats."""
    try:
        return StatsFd(ioctl(fd, ioctls.KVM_GET_STATS_FD))
    except KvmError:
        return None


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise KvmError("read of the stats fd", 5)  # EIO: a stats file shorter than its header says
    return data
