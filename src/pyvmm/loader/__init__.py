"""Kernel loaders: flat binaries, ELF32/ELF64 executables, Multiboot 1, and Linux (bzImage, PVH).

`load_kernel` reads a file and picks the format; `load_image` does the same for bytes.
Both return a BootEntry (CPU mode, entry point, initial registers) and raise only
LoaderError, whose message is one line naming what is wrong.

Linux: a bzImage boots through PVH by default (its vmlinux is decompressed on the host
once and cached, see loader.linux.extract), or through the 64-bit boot protocol with
boot="bzimage"; an ELF kernel with a PVH note (and no Multiboot header) boots through PVH.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence

from .. import file_digests
from ..arch.x86_64 import layout
from ..memory.guest_memory import GuestMemory
from .elf import is_elf, load_elf, parse_elf
from .entry import BootEntry, CpuMode, LoaderError
from .flat import load_flat
from .multiboot import find_header, load_multiboot

logger = logging.getLogger(__name__)

__all__ = [
    "BOOT_MODES",
    "BootEntry",
    "CpuMode",
    "LoaderError",
    "load_elf",
    "load_flat",
    "load_image",
    "load_kernel",
    "load_multiboot",
]

BOOT_MODES = ("auto", "pvh", "bzimage")


def load_image(memory: GuestMemory, data: bytes, *, cmdline: str = "",
               modules: Sequence[str | os.PathLike] = (), flat_address: int | None = None,
               flat_mode: CpuMode = CpuMode.PROTECTED_32, initrd: bytes | None = None,
               boot: str = "auto", rsdp: int | None = layout.ACPI_RSDP,
               cache_dir: str | os.PathLike | None = None, linux_cmdline: str = "",
               data_sha256: str | None = None) -> BootEntry:
    """Load kernel bytes: flat if `flat_address` is given, else bzImage, Multiboot, PVH ELF or plain ELF.

    `boot` picks the Linux boot path: "auto" (PVH when the kernel has a PVH note; for a
    Multiboot ELF, Multiboot), "pvh", or "bzimage" (the 64-bit boot protocol).  `initrd`
    is the Linux initramfs; `rsdp` the guest address of the ACPI RSDP handed to Linux
    (None: no ACPI tables); `cache_dir` overrides where extracted vmlinux files are kept.
    `linux_cmdline` goes before `cmdline` when the kernel is Linux (the user's word comes last).
    `data_sha256`: the sha256 of `data` where the caller knows it (a bzImage's cached vmlinux is
    found by it).
    """
    linux = f"{linux_cmdline} {cmdline}".strip()
    if boot not in BOOT_MODES:
        raise LoaderError(f"unknown boot method {boot!r} (expected one of {', '.join(BOOT_MODES)})")
    if flat_address is not None:
        _refuse_modules(modules, "a flat binary")
        _refuse_initrd(initrd, "a flat binary")
        entry = load_flat(memory, data, flat_address, flat_mode)
    else:
        from .linux.bzimage import is_bzimage

        if is_bzimage(data):
            _refuse_modules(modules, "a Linux bzImage")
            return _load_bzimage(memory, data, cmdline=linux, initrd=initrd, boot=boot, rsdp=rsdp,
                                 cache_dir=cache_dir, data_sha256=data_sha256)
        header = find_header(data)
        if boot == "bzimage":
            raise LoaderError("boot method 'bzimage' needs a Linux bzImage (no \"HdrS\" setup header here)")
        if header is not None and boot != "pvh":
            _refuse_initrd(initrd, "a Multiboot kernel")
            return load_multiboot(memory, data, header, cmdline=cmdline, modules=modules)
        if not is_elf(data):
            raise LoaderError("not an ELF or Multiboot kernel, nor a Linux bzImage")
        image = parse_elf(data)
        from .linux.pvh import find_pvh_entry, load_pvh

        if boot == "pvh" or find_pvh_entry(data) is not None:
            _refuse_modules(modules, "a PVH kernel")
            return load_pvh(memory, data, cmdline=linux, initrd=initrd, rsdp=rsdp,
                            kind=f"PVH ELF{image.bits} kernel")
        _refuse_modules(modules, "a plain ELF kernel")
        _refuse_initrd(initrd, "a plain ELF kernel without a PVH note")
        entry = load_elf(memory, data)
    if cmdline:
        # only Multiboot and Linux have a way to hand it over; keep it in the result all the same
        logger.warning("%s gets no command line from pyvmm; ignoring %r", entry.kind, cmdline)
    entry.cmdline = cmdline
    return entry


def _load_bzimage(memory: GuestMemory, data: bytes, *, cmdline: str, initrd: bytes | None, boot: str,
                  rsdp: int | None, cache_dir: str | os.PathLike | None, data_sha256: str | None) -> BootEntry:
    from .linux import NoPvhNoteError, extract_vmlinux_data, load_bzimage, load_pvh, parse_setup_header

    header = parse_setup_header(data)
    if boot == "bzimage":
        return load_bzimage(memory, data, cmdline=cmdline, initrd=initrd, rsdp=rsdp)
    try:
        path = extract_vmlinux_data(data, cache_dir=cache_dir, data_sha256=data_sha256)
    except NoPvhNoteError as exc:
        if boot == "pvh":
            raise
        logger.warning("%s; booting the bzImage through the 64-bit boot protocol instead", exc)
        return load_bzimage(memory, data, cmdline=cmdline, initrd=initrd, rsdp=rsdp)
    # Mapped, not read: a copy of the whole ~50 MB vmlinux would only be thrown away (and would
    # count in the VMM's peak memory); its segments go straight from the page cache to guest RAM.
    try:
        with open(path, "rb") as f:
            vmlinux = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise LoaderError(f"cannot read the extracted vmlinux {path}: {getattr(exc, 'strerror', None) or exc}") from None
    name = f"Linux {header.release}" if header.release else "Linux"
    try:
        return load_pvh(memory, vmlinux, cmdline=cmdline, initrd=initrd, rsdp=rsdp,
                        kind=f"{name} bzImage via PVH (vmlinux {path.name[:12]}...)")
    finally:
        try:
            vmlinux.close()
        except BufferError:  # a view is still alive (in an error's traceback): unmapped with it
            pass


def load_kernel(memory: GuestMemory, path: str | os.PathLike, *, cmdline: str = "",
                modules: Sequence[str | os.PathLike] = (), flat_address: int | None = None,
                flat_mode: CpuMode = CpuMode.PROTECTED_32, initrd: str | os.PathLike | None = None,
                boot: str = "auto", rsdp: int | None = layout.ACPI_RSDP,
                cache_dir: str | os.PathLike | None = None, linux_cmdline: str = "") -> BootEntry:
    """Read the kernel file at `path` (and the initrd file) and load them (see load_image).

    Errors name the kernel file; an unreadable initrd names the initrd.
    """
    name = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            data = f.read()
            after = os.fstat(f.fileno())
    except OSError as exc:
        raise LoaderError(f"{name}: cannot read kernel: {exc.strerror or exc}") from None
    initrd_data = None
    if initrd is not None:
        initrd_name = os.fsdecode(initrd)
        try:
            with open(initrd, "rb") as f:
                initrd_data = f.read()
        except OSError as exc:
            raise LoaderError(f"initrd {initrd_name}: cannot read: {exc.strerror or exc}") from None
        if not initrd_data:
            raise LoaderError(f"initrd {initrd_name} is empty")
    # (only where a bzImage may boot through PVH: its extracted vmlinux is found by the digest)
    digest = _kernel_digest(path, before, after, data) if flat_address is None and boot != "bzimage" else None
    try:
        return load_image(memory, data, cmdline=cmdline, modules=modules, flat_address=flat_address,
                          flat_mode=flat_mode, initrd=initrd_data, boot=boot, rsdp=rsdp, cache_dir=cache_dir,
                          linux_cmdline=linux_cmdline, data_sha256=digest)
    except LoaderError as exc:
        raise LoaderError(f"{name}: {exc}") from None


def _kernel_digest(path: str | os.PathLike, before: os.stat_result, after: os.stat_result,
                   data: bytes) -> str | None:
    """The sha256 of the kernel file's bytes `data` (read between the two fstat()s) where a bzImage's
    extracted vmlinux is looked up by it: remembered from an earlier run while the file is unchanged."""
    from .linux.bzimage import is_bzimage

    if not is_bzimage(data):
        return None
    return file_digests.sha256_of_read(path, before, after, data)


def _refuse_modules(modules: Sequence[str | os.PathLike], what: str) -> None:
    if modules:
        hint = " (give Linux its initramfs as the initrd)" if "Linux" in what or "PVH" in what else ""
        raise LoaderError(f"boot modules need a Multiboot kernel, this is {what}{hint}")


def _refuse_initrd(initrd: bytes | None, what: str) -> None:
    if initrd is not None:
        raise LoaderError(f"an initrd needs a Linux kernel (bzImage or PVH vmlinux), this is {what}")
