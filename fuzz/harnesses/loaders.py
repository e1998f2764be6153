"""The loaders, on kernel images a user hands in: ELF (32/64), Multiboot 1, the bzImage setup
header (64-bit boot protocol) and PVH ELF notes, each from seeds of its kind that the input
mutates. A bad image must be a LoaderError (one line), never another exception, and nothing
may be written outside guest RAM."""

from __future__ import annotations

from pyvmm.loader import load_image
from pyvmm.loader.entry import LoaderError
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

RAM = 32 << 20
_memory: GuestMemory | None = None


def _ram() -> GuestMemory:
    global _memory
    if _memory is None:
        _memory = GuestMemory.from_specs([RegionSpec(0, RAM)])
    return _memory


def _load(data: bytes, **kw) -> None:
    try:
        load_image(_ram(), data, **kw)
    except LoaderError:
        pass


def elf_input(data: bytes) -> None:
    from pyvmm.loader.elf import ElfImage, parse_elf

    try:
        image = parse_elf(data)
    except LoaderError:
        return
    assert isinstance(image, ElfImage)
    _load(data)


def multiboot_input(data: bytes) -> None:
    from pyvmm.loader.multiboot import find_header, load_multiboot

    try:
        header = find_header(data)
        if header is not None:
            load_multiboot(_ram(), data, header, cmdline="console=ttyS0")
    except LoaderError:
        pass


def bzimage_input(data: bytes) -> None:
    from pyvmm.loader.linux import parse_setup_header
    from pyvmm.loader.linux.bzimage import payload_of

    try:
        header = parse_setup_header(data)
        payload_of(data, header)
    except LoaderError:
        return
    _load(data, boot="bzimage", cmdline="console=ttyS0", initrd=b"\0" * 4096)


def pvh_input(data: bytes) -> None:
    from pyvmm.loader.linux.pvh import find_pvh_entry, load_pvh

    try:
        find_pvh_entry(data)
        load_pvh(_ram(), data, cmdline="console=ttyS0", initrd=b"\0" * 512)
    except LoaderError:
        pass
