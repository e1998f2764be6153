"""Flat binaries: the file is copied verbatim to one address, which is also the entry point."""

from __future__ import annotations

import logging

from ..memory.guest_memory import GuestMemory
from .entry import BootEntry, CpuMode, LoaderError, Placement, check_entry, check_range, write_placements

logger = logging.getLogger(__name__)


def load_flat(memory: GuestMemory, data: bytes, address: int,
              mode: CpuMode = CpuMode.PROTECTED_32) -> BootEntry:
    if not isinstance(mode, CpuMode):
        raise LoaderError(f"flat binary CPU mode must be a CpuMode, not {mode!r}")
    if not data:
        raise LoaderError("flat binary is empty")
    placement = Placement(address, data, len(data), "flat binary")
    check_range(memory, address, len(data), placement.what)
    check_entry(address, [placement])
    loaded = write_placements(memory, [placement])
    logger.info("flat binary: %#x bytes at %#x, %s", len(data), address, mode.value)
    return BootEntry(mode=mode, entry=address, kind="flat binary", loaded=loaded)
