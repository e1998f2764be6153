"""Host-virtual -> host-physical, from /proc/self/pagemap (Documentation/admin-guide/mm/pagemap.rst).

One 64-bit record per page of this process: bit 63 present in RAM, bit 62 swapped out, bit 56
mapped by this process only, bits 54:0 the page frame number. Since Linux 4.2 the PFN reads 0
without CAP_SYS_ADMIN: then the page's presence is known but not where it sits.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

_PRESENT, _SWAPPED, _EXCLUSIVE = 1 << 63, 1 << 62, 1 << 56
_PFN_MASK = (1 << 55) - 1


@dataclass(frozen=True)
class HostPage:
    virtual: int                 # the host-virtual address asked about
    present: bool                # the page is in host RAM, mapped in this process
    swapped: bool
    exclusive: bool              # mapped by this process only
    physical: int | None         # host-physical address; None: not present, or the PFN is hidden
    note: str                    # why `physical` is None, or ""

    def to_dict(self) -> dict:
        return {"hva": self.virtual, "present": self.present, "swapped": self.swapped, "exclusive": self.exclusive,
                "hpa": self.physical, "note": self.note}


def host_page(virtual: int, pagemap: str = "/proc/self/pagemap") -> HostPage:
    """Where the page holding `virtual` (an address in this process) is in host RAM."""
    page = mmap.PAGESIZE
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return HostPage(virtual, False, False, False, None, f"{pagemap} cannot be read: {exc.strerror}")
    try:
        record = os.pread(fd, 8, virtual // page * 8)
    except OSError as exc:
        return HostPage(virtual, False, False, False, None, f"{pagemap} cannot be read: {exc.strerror}")
    finally:
        os.close(fd)
    if len(record) != 8:
        return HostPage(virtual, False, False, False, None, "no pagemap record for this address")
    value = int.from_bytes(record, "little")
    present, swapped, exclusive = bool(value & _PRESENT), bool(value & _SWAPPED), bool(value & _EXCLUSIVE)
    if not present:
        note = "swapped out" if swapped else "not resident: no one touched this page yet (or it was discarded)"
        return HostPage(virtual, False, swapped, exclusive, None, note)
    pfn = value & _PFN_MASK
    if pfn == 0:
        return HostPage(virtual, True, swapped, exclusive, None,
                        "the kernel hides page frame numbers from processes without CAP_SYS_ADMIN")
    return HostPage(virtual, True, swapped, exclusive, pfn * page + virtual % page, "")
