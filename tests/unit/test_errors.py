"""One exception root: every exception class pyvmm defines derives from PyvmmError, and
errors.py depends on no other pyvmm module (every layer may import it)."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pyvmm
from pyvmm.errors import ConfigError, PyvmmError, UserError, user_error_message

# Modules that need something the unit tests do not (a running engine, a host tool) are still
# parsed below; the import walk only has to reach the modules that define exceptions.
SRC = Path(pyvmm.__file__).parent


def _exception_classes():
    for info in pkgutil.walk_packages(pyvmm.__path__, "pyvmm."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException):
                yield cls


def test_every_pyvmm_exception_derives_from_the_root():
    classes = list(_exception_classes())
    assert len(classes) > 30
    outside = [f"{cls.__module__}.{cls.__qualname__}" for cls in classes if not issubclass(cls, PyvmmError)]
    assert not outside, outside


def test_user_errors_are_marked_one_way():
    from pyvmm.bus import BusConflict
    from pyvmm.kvm import KvmUnavailable
    from pyvmm.loader import LoaderError
    from pyvmm.memory import GuestMemoryError

    for cls in (ConfigError, LoaderError, KvmUnavailable, GuestMemoryError, BusConflict):
        assert issubclass(cls, UserError), cls


def test_errors_module_imports_no_pyvmm_module():
    tree = ast.parse((SRC / "errors.py").read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(node, ast.ImportFrom) and node.module == "__future__" for node in imports)


def test_config_error_renders_the_field_under_any_name():
    exc = ConfigError("must be positive", "memory")
    assert str(exc) == "memory must be positive"
    assert exc.render("--memory") == "--memory must be positive"
    assert ConfigError(": unknown option 'x'", "disks[0]").render("--disk") == "--disk: unknown option 'x'"
    assert str(ConfigError("plain message")) == "plain message" and ConfigError("m").field is None


def test_user_error_message_is_one_line():
    assert user_error_message(UserError("first\nsecond")) == "first"
    assert user_error_message(FileNotFoundError(2, "No such file or directory", "/x")) == "/x: No such file or directory"
