"""The mypyc build of the hot modules (pyvmm/compiled.py): used only when it matches the tree."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys

import pytest

import pyvmm
from pyvmm import compiled

SUPPORT = "0123abcd__mypyc"


def _fake_build(directory, **changes):
    """A build directory whose manifest matches this tree (empty files stand for the objects)."""
    suffix = compiled.interpreter_tag()
    entries = {SUPPORT: {"file": SUPPORT + suffix}}
    for module in compiled.MODULES + compiled.C_MODULES:
        entries[module] = {"file": module + suffix, "sources": compiled.source_digests(module)}
    for entry in entries.values():
        (directory / entry["file"]).write_bytes(b"")
    manifest = {"version": compiled.MANIFEST_VERSION, "interpreter": suffix, "support": SUPPORT,
                "modules": entries}
    manifest.update(changes)
    (directory / compiled.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_a_build_of_this_tree_is_usable(tmp_path):
    _fake_build(tmp_path)
    located, reason = compiled.usable_build(tmp_path)
    assert reason == ""
    assert sorted(located) == sorted(compiled.MODULES + compiled.C_MODULES + (SUPPORT,))
    assert located["pyvmm.platform.lapic"] == tmp_path / ("pyvmm.platform.lapic" + compiled.interpreter_tag())


def test_an_edited_source_makes_the_whole_build_unused(tmp_path):
    manifest = _fake_build(tmp_path)
    manifest["modules"]["pyvmm.platform.pic"]["sources"] = {"pyvmm/platform/pic.py": "0" * 64}
    (tmp_path / compiled.MANIFEST).write_text(json.dumps(manifest))
    assert compiled.usable_build(tmp_path) == (None, "pyvmm.platform.pic changed since it was compiled")


@pytest.mark.parametrize("change, why", [
    ({"interpreter": ".cpython-312-x86_64-linux-gnu.so"}, "built for another interpreter"),
    ({"version": compiled.MANIFEST_VERSION + 1}, "built for another interpreter"),
    ({"support": "elsewhere__mypyc"}, "built for another set of modules"),
    ({"modules": {"pyvmm.platform.pic": {}}}, "built for another set of modules"),
    ({"modules": sorted(compiled.MODULES + compiled.C_MODULES + (SUPPORT,))}, "malformed manifest"),  # a list
])
def test_a_build_for_something_else_is_not_used(tmp_path, change, why):
    _fake_build(tmp_path, **change)
    located, reason = compiled.usable_build(tmp_path)
    assert located is None
    assert reason.startswith(why)


def test_an_edited_c_source_or_header_makes_the_whole_build_unused(tmp_path):
    """A C module is built from its .c source and the headers of its own it includes."""
    assert all(compiled.source_path(name).suffix == ".c" for name in compiled.C_MODULES)
    manifest = _fake_build(tmp_path)
    assert compiled.usable_build(tmp_path)[1] == ""
    module = "pyvmm.devices.virtio.net_receiver"
    sources = manifest["modules"][module]["sources"]
    assert sorted(sources) == ["pyvmm/devices/virtio/net_receiver.c", "pyvmm/devices/virtio/ring_thread.h"]
    for name in sources:
        edited = json.loads(json.dumps(manifest))
        edited["modules"][module]["sources"][name] = "0" * 64
        (tmp_path / compiled.MANIFEST).write_text(json.dumps(edited))
        assert compiled.usable_build(tmp_path) == (None, f"{module} changed since it was compiled")


def test_a_c_modules_sources_are_the_headers_of_its_own_it_includes(tmp_path):
    """A header of its own (`#include "x.h"`, beside it) is part of what was built; a system
    header (<...>) is not."""
    module = compiled.C_MODULES[0]
    source = tmp_path / os.path.relpath(compiled.source_path(module), compiled.PACKAGE_ROOT)
    source.parent.mkdir(parents=True)
    source.write_text('#include <Python.h>\n#include "shared.h"\nint f(void) { return g(); }\n')
    (source.parent / "shared.h").write_text("static int g(void) { return 1; }\n")
    relative = source.relative_to(tmp_path)
    digests = compiled.source_digests(module, tmp_path)
    assert sorted(digests) == sorted([str(relative), str(relative.with_name("shared.h"))])
    assert digests[str(relative.with_name("shared.h"))] == hashlib.sha256(b"static int g(void) { return 1; }\n").hexdigest()


def test_a_module_built_from_another_source_is_not_used(tmp_path):
    manifest = _fake_build(tmp_path)
    manifest["modules"]["pyvmm.platform.pic"]["sources"] = {"pyvmm/platform/pit.py": "0" * 64}
    (tmp_path / compiled.MANIFEST).write_text(json.dumps(manifest))
    assert compiled.usable_build(tmp_path) == (None, "pyvmm.platform.pic was built from other sources")


def test_the_sources_digests_are_remembered_while_unchanged(tmp_path, monkeypatch):
    """A second check hashes nothing: the digests come from file_digests' memo (which hashes a
    changed file again: tests/unit/test_file_digests.py)."""
    import hashlib as real_hashlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("pyvmm.file_digests.RACY_SECONDS", 0.0)  # the tree's files may be fresh from a checkout
    _fake_build(tmp_path)
    assert compiled.usable_build(tmp_path)[1] == ""
    hashed = []

    class Counting:
        def __init__(self, *args):
            hashed.append(args)
            self._digest = real_hashlib.sha256(*args)

        def __getattr__(self, name):
            return getattr(self._digest, name)

    monkeypatch.setattr(real_hashlib, "sha256", Counting)
    assert compiled.usable_build(tmp_path)[1] == ""
    assert hashed == []


def test_missing_corrupt_or_partial_builds_are_not_used(tmp_path):
    assert compiled.usable_build(tmp_path) == (None, "not built (scripts/compile builds it)")
    (tmp_path / compiled.MANIFEST).write_text("{not json")
    assert compiled.usable_build(tmp_path)[1].startswith("unreadable manifest")
    (tmp_path / compiled.MANIFEST).write_text("[]")
    assert compiled.usable_build(tmp_path)[1].startswith("malformed manifest")
    _fake_build(tmp_path)
    (tmp_path / ("pyvmm.platform.ioapic" + compiled.interpreter_tag())).unlink()
    assert compiled.usable_build(tmp_path) == (None, "pyvmm.platform.ioapic" + compiled.interpreter_tag() + " is missing")


def test_this_process_uses_the_build_unless_told_not_to():
    """What the suite tests: the compiled modules, unless PYVMM_COMPILED=0 (./scripts/test runs
    the unit tests both ways). A tree edited since ./scripts/setup compiled it fails here."""
    in_use, reason = compiled.status()
    loaded_from = {module: importlib.import_module(module).__file__ for module in compiled.MODULES}
    if os.environ.get("PYVMM_COMPILED", "1") == "0":
        assert (in_use, reason) == (False, "PYVMM_COMPILED=0")
        assert all(path.endswith(".py") for path in loaded_from.values()), loaded_from
        for module in compiled.C_MODULES:  # (no Python source: the caller falls back)
            with pytest.raises(ImportError):
                importlib.import_module(module)
    else:
        assert in_use, f"the compiled modules are not in use: {reason} (./scripts/setup builds them)"
        loaded_from.update({module: importlib.import_module(module).__file__ for module in compiled.C_MODULES})
        build = str(compiled.build_directory())
        assert all(path.startswith(build) for path in loaded_from.values()), loaded_from


def test_pyvmm_compiled_0_loads_every_module_from_source():
    code = ("import importlib, pyvmm; from pyvmm import compiled\n"
            "print(compiled.status()[1]); print(all(importlib.import_module(m).__file__.endswith('.py') "
            "for m in compiled.MODULES))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYVMM_COMPILED="0"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["PYVMM_COMPILED=0", "True"]
    assert pyvmm.__file__.endswith(".py")
