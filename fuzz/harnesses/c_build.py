"""A C module of the compiled group, loaded from the build for a harness even where the fuzzer
runs the rest as Python (PYVMM_COMPILED=0: its coverage is Python's)."""

from __future__ import annotations

import importlib.util
import sys

from pyvmm.compiled import build_directory, c_module, usable_build


def load_c_module(name: str) -> bool:
    """Make `name` (one of compiled.C_MODULES) importable where c_module() looks for it; False
    where it is not built."""
    if c_module(name) is not None:
        return True
    located, _ = usable_build(build_directory())
    if located is None:
        return False
    spec = importlib.util.spec_from_file_location(name, located[name])
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module  # where c_module() finds it
    return True
