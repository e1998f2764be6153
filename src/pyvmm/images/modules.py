"""Kernel modules for the guest initramfs: find them, resolve dependencies, order the loads.

Debian's linux-image package ships ``lib/modules/VERSION/`` without ``modules.dep``
(the postinst runs depmod).  Rather than depend on the host's kmod, the
dependencies are read from each module's ``.modinfo`` ELF section (``depends=``,
the same data depmod uses), and a ``modules.dep`` for the modules we ship is
written into the initramfs so that busybox ``modprobe`` works in the guest too.

Module names are compared with ``-`` folded to ``_`` (as the kernel does):
``virtio-rng.ko`` is module ``virtio_rng``.
"""

from __future__ import annotations

import gzip
import lzma
import os
import pathlib
import shutil
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import PyvmmError

__all__ = [
    "DEFAULT_MODULES",
    "KernelModule",
    "ModuleError",
    "ModuleIndex",
    "format_load_list",
    "format_modules_dep",
    "load_order",
    "module_name",
    "parse_modules_dep",
    "read_modinfo",
]

# The virtio/vsock drivers the default guest loads, in load order (see shared/ENVIRONMENT.md).
DEFAULT_MODULES: tuple[str, ...] = (
    "pvpanic-mmio",  # reports a kernel panic to the VMM (ACPI QEMU0001), first so it covers the rest
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_ring",
    "virtio",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    "virtio_balloon",  # the balloon: inflate/deflate, statistics, free page reporting
    "virtio_mem",      # memory plugged and unplugged in blocks while the guest runs (pyvmm mem resize)
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "button",  # the ACPI power button (PNP0C0C) pyvmm's GED notifies: KEY_POWER on an input device
    "evdev",   # /dev/input/event*, where init waits for that key (loaded by init, not by coldplug)
)

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class ModuleError(PyvmmError):
    """A module is unreadable, or the dependency graph is broken (cycle)."""


def module_name(file_name: str) -> str:
    """'virtio-rng.ko.xz' or 'virtio-rng' -> 'virtio_rng'."""
    base = os.path.basename(file_name)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def decompress_module(path: pathlib.Path) -> bytes:
    """The plain ELF bytes of a module file (busybox insmod cannot read compressed modules)."""
    data = path.read_bytes()
    name = path.name
    try:
        if name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if name.endswith(".ko.gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise ModuleError(f"{path}: cannot decompress: {exc}") from None
    if name.endswith(".ko.zst"):
        try:
            import zstandard

            return zstandard.ZstdDecompressor().decompress(data, max_output_size=256 << 20)
        except ImportError:
            pass
        if shutil.which("zstd") is None:
            raise ModuleError(f"{path}: zstd-compressed module and neither python zstandard nor zstd(1) installed")
        result = subprocess.run(["zstd", "-dc", str(path)], capture_output=True)
        if result.returncode != 0:
            raise ModuleError(f"{path}: zstd -d failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout
    return data


def read_modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section, as key -> values."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        raise ModuleError("not an ELF file")
    if elf[4] != 2 or elf[5] != 1:
        raise ModuleError("not a little-endian ELF64 module")
    try:
        (shoff,) = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
        strtab_offset = sections[shstrndx][4]
        for sh_name, _type, _flags, _addr, offset, size, *_ in sections:
            start = strtab_offset + sh_name
            if elf[start:elf.index(b"\0", start)] == b".modinfo":
                info: dict[str, list[str]] = {}
                for item in elf[offset:offset + size].split(b"\0"):
                    if b"=" in item:
                        key, _, value = item.decode("utf-8", "replace").partition("=")
                        info.setdefault(key, []).append(value)
                return info
    except (struct.error, IndexError, ValueError) as exc:
        raise ModuleError(f"malformed ELF: {exc}") from None
    raise ModuleError("no .modinfo section")


@dataclass(frozen=True)
class KernelModule:
    name: str            # 'virtio_rng'
    relpath: str         # 'kernel/drivers/char/hw_random/virtio-rng.ko' (as found, maybe compressed)
    depends: tuple[str, ...]
    aliases: tuple[str, ...] = ()  # the devices it drives, as modalias globs ('virtio:d00000004v*')

    @property
    def plain_relpath(self) -> str:
        """Where the decompressed module goes in the initramfs ('....ko')."""
        for suffix in MODULE_SUFFIXES[1:]:
            if self.relpath.endswith(suffix):
                return self.relpath[: -len(suffix)] + ".ko"
        return self.relpath


class ModuleIndex:
    """The modules of one kernel: ``lib/modules/VERSION`` of an extracted linux-image package."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)
        self.paths: dict[str, str] = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path.name.endswith(MODULE_SUFFIXES):
                self.paths.setdefault(module_name(path.name), path.relative_to(self.root).as_posix())
        self.builtin: set[str] = set()
        builtin_file = self.root / "modules.builtin"
        if builtin_file.exists():
            self.builtin = {module_name(line.strip()) for line in builtin_file.read_text().splitlines() if line.strip()}
        self._cache: dict[str, KernelModule] = {}

    def __contains__(self, name: str) -> bool:
        return module_name(name) in self.paths

    def get(self, name: str) -> KernelModule:
        name = module_name(name)
        if name not in self._cache:
            relpath = self.paths.get(name)
            if relpath is None:
                raise KeyError(name)
            info = read_modinfo(self.elf(relpath))
            depends = tuple(module_name(d) for value in info.get("depends", []) for d in value.split(",") if d)
            self._cache[name] = KernelModule(name, relpath, depends, tuple(info.get("alias", [])))
        return self._cache[name]

    def elf(self, relpath: str) -> bytes:
        try:
            return decompress_module(self.root / relpath)
        except ModuleError as exc:
            raise ModuleError(f"{relpath}: {exc}") from None

    def dependencies(self) -> dict[str, tuple[str, ...]]:
        """Name -> direct dependencies, for every module reachable from those already looked up."""
        return {name: module.depends for name, module in self._cache.items()}

    def resolve(self, wanted: list[str] | tuple[str, ...]) -> tuple[list[KernelModule], list[str]]:
        """The modules to load for `wanted`, dependencies first, and the names found nowhere.

        Built-in modules are dropped silently (they need no loading).
        """
        graph: dict[str, tuple[str, ...]] = {}
        missing: list[str] = []
        stack = [module_name(w) for w in wanted]
        while stack:
            name = stack.pop()
            if name in graph or name in missing:
                continue
            if name in self.builtin and name not in self.paths:
                graph[name] = ()
                continue
            if name not in self.paths:
                missing.append(name)
                continue
            module = self.get(name)
            graph[name] = module.depends
            stack.extend(module.depends)
        order = load_order([module_name(w) for w in wanted if module_name(w) not in missing], graph)
        modules = [self.get(name) for name in order if name in self.paths]
        return modules, missing


def load_order(wanted: Sequence[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Order `wanted` and everything they depend on so that each module follows its dependencies.

    The order of `wanted` is kept wherever the dependencies allow it (a depth-first walk that
    emits a module after its dependencies).  Names missing from `depends` are taken to have no
    dependencies.  A dependency cycle raises ModuleError.
    """
    order: list[str] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in active:
            cycle = active[active.index(name):] + [name]
            raise ModuleError("module dependency cycle: " + " -> ".join(cycle))
        active.append(name)
        for dep in depends.get(name, ()):
            visit(dep)
        active.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(module_name(name))
    return order


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """Parse depmod's ``modules.dep`` ('path.ko: dep.ko dep2.ko') into module name -> dependencies."""
    graph: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise ModuleError(f"modules.dep line {lineno}: no ':'")
        graph[module_name(path.strip())] = tuple(module_name(dep) for dep in rest.split())
    return graph


def format_modules_dep(modules: list[KernelModule]) -> str:
    """A ``modules.dep`` for `modules` (plain .ko paths), with every dependency listed transitively.

    depmod's order: the module to load last comes first (modprobe loads the list backwards).
    """
    by_name = {m.name: m for m in modules}
    graph = {m.name: m.depends for m in modules}
    lines = []
    for module in sorted(modules, key=lambda m: m.plain_relpath):
        chain = [n for n in load_order([module.name], graph) if n != module.name and n in by_name]
        deps = " ".join(by_name[n].plain_relpath for n in reversed(chain))
        lines.append(f"{module.plain_relpath}:{' ' + deps if deps else ''}")
    return "\n".join(lines) + "\n"


def _alias_regex(glob: str) -> str:
    """A modalias glob ('*' only, as the kernel writes them) as an anchored POSIX ERE."""
    return "^" + "".join(".*" if c == "*" else ("\\" + c if c in ".[]()+?{}|^$\\" else c) for c in glob) + "$"


def format_load_list(modules: list[KernelModule], missing: list[str] | tuple[str, ...] = ()) -> str:
    """The guest's ``pyvmm.load``: one module per line, dependencies first, as
    ``NAME PATH NEEDS ALIAS...``: NEEDS lists every module NAME depends on (comma-separated,
    or ``-``), each ALIAS is an anchored regular expression for the modaliases of the devices
    it drives (none for a library module). /init loads a module when a device present
    matches one of its aliases, after what it needs. A module the kernel package lacks is
    listed as ``NAME -``."""
    graph = {m.name: m.depends for m in modules}
    known = {m.name for m in modules}
    lines = []
    for module in modules:
        needs = [n for n in load_order([module.name], graph) if n != module.name and n in known]
        fields = [module.name, module.plain_relpath, ",".join(needs) or "-", *map(_alias_regex, module.aliases)]
        lines.append(" ".join(fields))
    lines.extend(f"{name} -" for name in missing)
    return "".join(line + "\n" for line in lines)
