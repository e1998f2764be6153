"""A package's names loaded from its modules at first use (PEP 562), not when it is imported.

`pyvmm run --kernel` and every other command import some packages for one or two of their
modules (the image builder for `pyvmm image`'s parser, the Linux loader to tell an ELF kernel
from a bzImage, net/ for the seccomp allowlist's TAP ioctls); importing every module of each at
start-up cost a VM's start several milliseconds. A package lists where each of its names is
defined and installs the pair this returns as its module-level `__getattr__` and `__dir__`;
type checkers read the same names from imports under `if TYPE_CHECKING:` beside it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_exports(package: str, sources: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`, whose names (`sources`: name -> its module, relative
    to the package) are loaded at first use and then kept in the package's namespace."""
    def __getattr__(name: str) -> object:
        module = sources.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{module}", package), name)
        setattr(import_module(package), name, value)  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(import_module(package)), *sources})

    return __getattr__, __dir__
