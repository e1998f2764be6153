"""The compiled modules' constants are Final (compiled.py): mypyc inlines a Final constant, or
keeps it in a C static, where a plain module global is looked up by name in the module's
dictionary at every use (a virtqueue pop took twice as long). This checks the rule holds for
the constants the compiled modules define and for those they import from plain modules."""

from __future__ import annotations

import ast
import pathlib

import pyvmm
from pyvmm import compiled

SRC = pathlib.Path(pyvmm.__file__).parent.parent
NOT_CONSTANTS = {"log", "_libc", "_run_ioctl", "_errno_location", "MsiVectorFactory"}  # objects, a type alias


def _source(module: str) -> ast.Module:
    return ast.parse((SRC / pathlib.Path(*module.split("."))).with_suffix(".py").read_text())


def _plain_constants(tree: ast.Module) -> set[str]:
    """Module-level names bound by a plain (not Final-annotated) assignment."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names |= {e.id for e in elements if isinstance(e, ast.Name)}
    return names - NOT_CONSTANTS


def _imported_constants(module: str, tree: ast.Module) -> dict[str, set[str]]:
    """Upper-case names the module imports from pyvmm modules outside the compiled group."""
    package = module.rsplit(".", 1)[0].split(".")
    found: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            source = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            names = {alias.name for alias in node.names if alias.name.lstrip("_").isupper()}
            if names and source not in compiled.MODULES:
                found.setdefault(source, set()).update(names)
    return found


def test_the_compiled_modules_own_constants_are_final():
    plain = {module: sorted(names) for module in compiled.MODULES if (names := _plain_constants(_source(module)))}
    assert plain == {}


def test_constants_they_import_from_plain_modules_are_final():
    plain = {}
    for module in compiled.MODULES:
        for source, names in _imported_constants(module, _source(module)).items():
            if names & _plain_constants(_source(source)):
                plain[f"{module} <- {source}"] = sorted(names & _plain_constants(_source(source)))
    assert plain == {}
