"""The hot modules, compiled to C by mypyc from this source.

A console byte, a disk request or a packet on the software CPU runs the same few Python
methods many times: port I/O into the 16550, its interrupt line through the PIC, the IOAPIC
and the APIC bus into the LAPIC, the acknowledge and the EOI; a virtqueue's rings in guest
memory, MSI-X and MSI. On KVM every port-I/O or MMIO exit runs KVM_RUN's loop
(accel/kvm/io_exits.py, kvm/run.py). Compiled by mypyc (the type
checker's compiler: the same source, typed as it already is for mypy) these run as C, their
calls to each other as C calls. `scripts/compile` builds them into the environment
(`<sys.prefix>/pyvmm-compiled/`) with a manifest of the sources they were built from;
`./scripts/setup` runs it.

`install()` (called when pyvmm is imported) puts a finder before Python's own; when one of
those modules is first imported, it checks the build (nothing on `import pyvmm` alone), then
loads them from the build, all of them or none: compiled modules call each other's
methods directly, so a build is used only if every one of its sources is byte for byte the
file in this tree, on the Python it was built for (the sources' digests are remembered while
the files are unchanged, file_digests.py: no hashing at every start). An edited source,
another interpreter, a missing or corrupt build, or PYVMM_COMPILED=0 in the environment: the
modules load from their Python source as before, with the same behaviour (the tests run both
ways).

What a module in the group must keep to (mypyc's rules, each met once the hard way): a class
has one base class plus traits (`trait` below; the LAPIC's mixins); no saved-state dataclass
(persist.State) in the group, they live in `*_state.py`; no method alias (`__call__ = now_ns`
builds a broken class); no `del` of an attribute; the annotations are checked at run time, so
a fake passed to a compiled function must be of the annotated class, or the parameter a
Protocol; instances' methods cannot be replaced (a test subclasses a class marked
`mypyc_attr(allow_interpreted_subclasses=True)` instead); an attribute named `_thread` becomes
the C keyword `__thread`. And for speed: a module constant they use, theirs or imported from a
plain module, is `Final` (inlined, or a C static), else each use is a lookup in the module's
globals by name (that made a virtqueue pop twice as slow).
"""

from __future__ import annotations

import _thread
import os
import sys

TYPE_CHECKING = False  # (typing.TYPE_CHECKING, without importing typing: mypy reads it by name)
if TYPE_CHECKING:
    import pathlib
    from typing import Any

    from mypy_extensions import mypyc_attr, trait
else:
    # The decorators mypyc reads (a class compiled with traits; a compiled class interpreted
    # code may subclass) are mypy_extensions' for mypy and mypyc; at run time they change
    # nothing, as these do (mypy_extensions is needed to compile, not to run).
    def trait(cls):
        return cls

    def mypyc_attr(*_args, **_kwargs):
        return lambda cls: cls


# The compiled group. Every class a compiled class derives from is in it (mypyc needs the
# whole hierarchy); the saved-state dataclasses live in modules of their own, outside it.
MODULES = (
    "pyvmm.accel.kvm.io_exits",
    "pyvmm.accel.tcg.direct_hooks",
    "pyvmm.accel.tcg.guest_io",
    "pyvmm.devices.legacy.port80",
    "pyvmm.devices.legacy.uart16550",
    "pyvmm.devices.virtio.net_rx",
    "pyvmm.devices.virtio.queue",
    "pyvmm.host.console_output",
    "pyvmm.kvm.run",
    "pyvmm.memory.guest_memory",
    "pyvmm.pci.msix",
    "pyvmm.platform.apic_bus",
    "pyvmm.platform.clock",
    "pyvmm.platform.ioapic",
    "pyvmm.platform.irq_router",
    "pyvmm.platform.lapic",
    "pyvmm.platform.lapic_persist",
    "pyvmm.platform.lapic_registers",
    "pyvmm.platform.lapic_timer",
    "pyvmm.platform.machine",
    "pyvmm.platform.msi",
    "pyvmm.platform.pic",
    "pyvmm.platform.pit",
)
# Built with the group from C sources of the same name (.c), loaded with it, all or none:
# the software CPU's port-I/O and MMIO hooks (accel/tcg/hook_trampolines.c), which call the
# group's guest_io.py, the software CPU's translated code dropped for device writes
# (accel/tcg/native_code_drop.c), KVM_RUN with the GIL released and the KVM vCPU's hot loop
# (kvm/native_run.c), guest RAM loaded without the GIL when the uffd handler died
# (snapshot/uffd_rescue.c), disk data moved by threads without the GIL
# (host/transfer_threads.c), and virtio-net's receive and transmit paths in threads without
# the GIL (devices/virtio/net_receiver.c, net_transmitter.c; what they share: ring_thread.h).
# Optional to their users: without a usable build they do not import.
C_MODULES = ("pyvmm.accel.tcg.hook_trampolines", "pyvmm.accel.tcg.native_code_drop", "pyvmm.host.transfer_threads",
             "pyvmm.kvm.native_run", "pyvmm.snapshot.uffd_rescue", "pyvmm.devices.virtio.net_receiver",
             "pyvmm.devices.virtio.net_transmitter")


def c_module(name: str) -> Any:
    """The C module `name` (one of C_MODULES), or None where the build is not in use (none, an
    edited source, PYVMM_COMPILED=0): its user then takes its Python or ctypes path."""
    import importlib

    assert name in C_MODULES, name
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: each module's source files with their digests (1: one digest per module)
# The directory holding pyvmm/. (The imports the checks need are made when they run: `import
# pyvmm` alone stays cheap.)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_directory() -> pathlib.Path:
    import pathlib

    return pathlib.Path(sys.prefix) / "pyvmm-compiled"


def source_path(module: str) -> pathlib.Path:
    import pathlib

    return pathlib.Path(PACKAGE_ROOT, source_relpath(module))


def source_relpath(module: str) -> str:
    """A module's source (.py, or .c for C_MODULES), relative to the directory holding pyvmm/."""
    return os.path.join(*module.split(".")) + (".c" if module in C_MODULES else ".py")


def source_files(module: str, root: str | os.PathLike = PACKAGE_ROOT) -> list[str]:
    """What `module` is built from, relative to `root` (the directory holding pyvmm/): its
    source, and for a C module the headers of its own it includes (`#include "name.h"`, beside it)."""
    import re

    source = source_relpath(module)
    files = [source]
    if source.endswith(".c"):
        with open(os.path.join(root, source), "rb") as f:
            for name in re.findall(rb'^#include "([^"/]+)"', f.read(), re.MULTILINE):
                files.append(os.path.join(os.path.dirname(source), name.decode()))
    return files


def source_digests(module: str, root: str | os.PathLike = PACKAGE_ROOT) -> dict[str, str]:
    """{file: sha256} of what `module` is built from (source_files) under `root`, as scripts/compile
    records them in the manifest."""
    import hashlib

    digests = {}
    for name in source_files(module, root):
        with open(os.path.join(root, name), "rb") as f:
            digests[name] = hashlib.sha256(f.read()).hexdigest()
    return digests


def interpreter_tag() -> str:
    """What a build is only good for: this CPython's ABI (its extension suffix)."""
    import importlib.machinery

    return importlib.machinery.EXTENSION_SUFFIXES[0]


def usable_build(directory: pathlib.Path) -> tuple[dict[str, pathlib.Path] | None, str]:
    """(module -> shared object, "") if the build in `directory` matches this tree and this
    interpreter, else (None, why not)."""
    import json

    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "not built (scripts/compile builds it)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable manifest: {exc}"
    try:
        if manifest["version"] != MANIFEST_VERSION or manifest["interpreter"] != interpreter_tag():
            return None, "built for another interpreter or by another scripts/compile"
        entries = manifest["modules"]
        if sorted(entries) != sorted(MODULES + C_MODULES + (manifest["support"],)):
            return None, "built for another set of modules"
        located: dict[str, pathlib.Path] = {}
        built_from: list[tuple[str, str, str]] = []  # (module, file, its sha256 when built)
        for module, entry in entries.items():
            shared_object = directory / entry["file"]
            if not shared_object.is_file():
                return None, f"{entry['file']} is missing"
            if module != manifest["support"]:
                if source_relpath(module) not in entry["sources"]:
                    return None, f"{module} was built from other sources"
                built_from += [(module, name, digest) for name, digest in entry["sources"].items()]
            located[module] = shared_object
        from .file_digests import sha256_files  # remembered while a file is unchanged: no hashing at every start

        try:
            now = sha256_files([os.path.join(PACKAGE_ROOT, name) for _module, name, _digest in built_from])
        except OSError as exc:
            return None, f"a source is unreadable: {exc}"
        for (module, _name, digest), current in zip(built_from, now):
            if digest != current:
                return None, f"{module} changed since it was compiled"
    except (KeyError, TypeError, AttributeError, OSError) as exc:
        return None, f"malformed manifest: {exc!r}"
    return located, ""


class _CompiledFinder:
    """A sys.meta_path finder for the group: decides at the first import of one of its modules."""

    def __init__(self) -> None:
        self.located: dict[str, pathlib.Path] | None = None   # None: not decided yet
        self._lock = _thread.allocate_lock()

    def find_spec(self, fullname, path=None, target=None):
        if self.located is None:
            if fullname not in MODULES and fullname not in C_MODULES:
                return None
            self._decide()
        assert self.located is not None
        shared_object = self.located.get(fullname)
        if shared_object is None:
            return None
        import importlib.util

        return importlib.util.spec_from_file_location(fullname, shared_object)

    def _decide(self) -> None:
        with self._lock:
            if self.located is not None:
                return
            located, reason = usable_build(build_directory())
            if located is not None:
                import importlib

                support = next(module for module in located if module not in MODULES + C_MODULES)
                self.located = located
                try:  # the library every compiled module links to: one that cannot load must not be half used
                    importlib.import_module(support)
                except ImportError as exc:
                    located, reason = None, f"the build does not load: {exc}"
            self.located = located or {}
            _state.update(in_use=located is not None, reason=reason)


_state: dict[str, object] = {"in_use": False, "reason": "not installed"}
_finder: _CompiledFinder | None = None


def install() -> None:
    """Load the compiled modules from now on, if the build is usable (see the module's doc)."""
    global _finder
    if os.environ.get("PYVMM_COMPILED", "1") == "0":
        _state["reason"] = "PYVMM_COMPILED=0"
        return
    if any(module in sys.modules for module in MODULES):
        _state["reason"] = "the Python modules were imported first"
        return
    _finder = _CompiledFinder()
    sys.meta_path.insert(0, _finder)


def status() -> tuple[bool, str]:
    """(whether the compiled modules are in use, why not); checks the build if no compiled
    module was imported yet."""
    if _finder is not None and _finder.located is None:
        _finder._decide()
    return bool(_state["in_use"]), str(_state["reason"])
