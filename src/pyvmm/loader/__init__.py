"""Kernel loaders for non-Linux kernels: flat binaries, ELF32/ELF64 executables, Multiboot 1.

`load_kernel` reads a file and picks the format; `load_image` does the same for bytes.
Both return a BootEntry (CPU mode, entry point, initial registers) and raise only
LoaderError, whose message is one line naming what is wrong.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ..memory.guest_memory import GuestMemory
from .elf import is_elf, load_elf
from .entry import BootEntry, CpuMode, LoaderError
from .flat import load_flat
from .multiboot import find_header, load_multiboot

logger = logging.getLogger(__name__)

__all__ = [
    "BootEntry",
    "CpuMode",
    "LoaderError",
    "load_elf",
    "load_flat",
    "load_image",
    "load_kernel",
    "load_multiboot",
]


def load_image(memory: GuestMemory, data: bytes, *, cmdline: str = "",
               modules: Sequence[str | os.PathLike] = (), flat_address: int | None = None,
               flat_mode: CpuMode = CpuMode.PROTECTED_32) -> BootEntry:
    """Load kernel bytes: flat if `flat_address` is given, else Multiboot, else plain ELF."""
    if flat_address is not None:
        _refuse_modules(modules, "a flat binary")
        entry = load_flat(memory, data, flat_address, flat_mode)
    else:
        header = find_header(data)
        if header is not None:
            return load_multiboot(memory, data, header, cmdline=cmdline, modules=modules)
        if not is_elf(data):
            raise LoaderError("not an ELF or Multiboot kernel")
        _refuse_modules(modules, "a plain ELF kernel")
        entry = load_elf(memory, data)
    if cmdline:
        # only Multiboot has a way to hand it over; keep it in the result all the same
        logger.warning("%s gets no command line from pyvmm; ignoring %r", entry.kind, cmdline)
    entry.cmdline = cmdline
    return entry


def load_kernel(memory: GuestMemory, path: str | os.PathLike, *, cmdline: str = "",
                modules: Sequence[str | os.PathLike] = (), flat_address: int | None = None,
                flat_mode: CpuMode = CpuMode.PROTECTED_32) -> BootEntry:
    """Read the kernel file at `path` and load it (see load_image); errors name the file."""
    name = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LoaderError(f"{name}: cannot read kernel: {exc.strerror or exc}") from None
    try:
        return load_image(memory, data, cmdline=cmdline, modules=modules,
                          flat_address=flat_address, flat_mode=flat_mode)
    except LoaderError as exc:
        raise LoaderError(f"{name}: {exc}") from None


def _refuse_modules(modules: Sequence[str | os.PathLike], what: str) -> None:
    if modules:
        raise LoaderError(f"boot modules need a Multiboot kernel, this is {what}")
