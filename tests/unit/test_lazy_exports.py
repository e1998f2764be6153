"""Packages whose names load at first use (lazy_exports.py): each name is its module's, and
importing the package imports none of those modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["pyvmm.images", "pyvmm.net", "pyvmm.loader.linux", "pyvmm.accel.kvm", "pyvmm.kvm"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_is_the_one_its_module_defines(package):
    module = importlib.import_module(package)
    for name, source in module._SOURCES.items():
        assert getattr(module, name) is getattr(importlib.import_module(f"{package}.{source}"), name), name
    assert set(module._SOURCES) <= set(dir(module)) and module.__all__ == sorted(module._SOURCES)


@pytest.mark.parametrize("package", PACKAGES)
def test_an_unknown_name_is_an_attribute_error(package):
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        getattr(importlib.import_module(package), "nope")


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_the_package_imports_none_of_its_modules_until_a_name_is_used(package):
    code = (f"import sys, {package} as p\n"
            f"sources = set(p._SOURCES.values())\n"
            f"print(sorted(m for m in sources if '{package}.' + m in sys.modules))\n"
            f"name = sorted(p._SOURCES)[0]\n"
            f"getattr(p, name)\n"
            f"print(p._SOURCES[name] in [m for m in sources if '{package}.' + m in sys.modules])\n"
            f"from {package} import *\n"
            f"print(all(n in globals() for n in p.__all__))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["[]", "True", "True"]
