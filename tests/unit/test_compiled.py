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
        entries[module] = {"file": module + suffix, "source_sha256": compiled.source_digest(module)}
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
    manifest["modules"]["pyvmm.platform.pic"]["source_sha256"] = "0" * 64
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


def test_an_edited_c_source_makes_the_whole_build_unused(tmp_path, monkeypatch):
    """The C modules' digests are of their .c sources."""
    module = compiled.C_MODULES[0]
    assert all(compiled.source_path(name).suffix == ".c" for name in compiled.C_MODULES)
    _fake_build(tmp_path)
    assert compiled.usable_build(tmp_path)[1] == ""
    digest = compiled.source_digest
    monkeypatch.setattr(compiled, "source_digest", lambda name: "0" * 64 if name == module else digest(name))
    assert compiled.usable_build(tmp_path) == (None, f"{module} changed since it was compiled")


def test_a_c_source_digest_covers_the_headers_it_includes(tmp_path):
    """A header of its own (`#include "x.h"`, beside it) is part of what was built: editing it
    changes the digest; a system header (<...>) is not read."""
    source, header = tmp_path / "module.c", tmp_path / "shared.h"
    source.write_text('#include <Python.h>\n#include "shared.h"\nint f(void) { return g(); }\n')
    header.write_text("static int g(void) { return 1; }\n")
    before = compiled.file_digest(source)
    assert compiled.file_digest(source) == before
    header.write_text("static int g(void) { return 2; }\n")
    assert compiled.file_digest(source) != before
    # the tree's own: both virtio-net ring threads include ring_thread.h
    shared = compiled.source_path("pyvmm.devices.virtio.net_transmitter").with_name("ring_thread.h")
    for module in ("pyvmm.devices.virtio.net_receiver", "pyvmm.devices.virtio.net_transmitter"):
        text = compiled.source_path(module).read_bytes()
        assert b'#include "ring_thread.h"' in text
        assert compiled.source_digest(module) == hashlib.sha256(text + shared.read_bytes()).hexdigest()


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
