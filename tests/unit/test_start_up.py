"""start_up: dataclass code compiled once and reused by later runs; start-up's heap frozen out
of collection when the VM starts."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import marshal
import os
import subprocess
import sys
import time
import weakref

import pytest

from pyvmm import start_up


@pytest.fixture(autouse=True)
def restore_process(tmp_path, monkeypatch):
    """Each test gets the collector, the dataclasses module and a cache directory of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(start_up, "_codes", start_up._CodeCache())
    monkeypatch.setattr(start_up, "CACHED_MODULES", __name__)  # this module's classes, as if pyvmm's
    start_up.end()
    frozen = gc.get_freeze_count()
    yield
    start_up.end()
    if gc.get_freeze_count() != frozen:
        gc.unfreeze()
    if "exec" in vars(dataclasses):
        del dataclasses.exec  # type: ignore[attr-defined]


class Cycle:
    def __init__(self, other) -> None:
        self.other = other
        other.append(self)


def test_start_ups_heap_frozen_when_the_vm_starts():
    start_up.begin()
    made = [[i] for i in range(1000)]  # what start-up makes
    garbage: list = []
    watch = weakref.ref(Cycle(garbage))  # a cycle start-up left behind
    del garbage
    start_up.vm_starting()
    assert watch() is None  # collected, not frozen
    assert gc.get_freeze_count() >= len(made)  # out of every later pass
    frozen = gc.get_freeze_count()
    more = [[i] for i in range(1000)]
    start_up.vm_starting()  # a second VM in the process: nothing more frozen
    assert gc.get_freeze_count() == frozen and more


def test_a_vm_in_a_library_process_leaves_the_collector_alone():
    frozen = gc.get_freeze_count()
    start_up.vm_starting()
    assert gc.get_freeze_count() == frozen


def test_a_vm_after_the_entry_point_returned_is_a_librarys():
    start_up.begin()
    start_up.end()  # e.g. `pyvmm.cli.main([...])` called by a program that goes on
    frozen = gc.get_freeze_count()
    start_up.vm_starting()
    assert gc.get_freeze_count() == frozen
    make_class()  # compiled after a VM started here: never written (its seccomp filter)
    start_up._codes.save()  # what the exit handler does
    assert not os.path.exists(start_up.code_file())


def make_class():
    @dataclasses.dataclass(frozen=True)
    class Point:
        x: int
        y: int = 2
    return Point


def refuse_compile(*args, **kwargs):
    raise AssertionError("compiled again")


def test_dataclass_code_kept_for_the_next_run(monkeypatch):
    start_up.begin()
    Point = make_class()
    start_up.vm_starting()
    assert os.path.exists(start_up.code_file())
    # the next run: a new process reads the file and compiles nothing it holds
    assert "exec" not in vars(dataclasses) and not start_up._codes._codes  # gone with the last save
    monkeypatch.setattr(start_up, "_codes", start_up._CodeCache())
    monkeypatch.setattr(start_up, "CACHED_MODULES", __name__)  # this module's classes, as if pyvmm's
    start_up.begin()
    monkeypatch.setattr(start_up, "compile", refuse_compile, raising=False)
    Again = make_class()
    # and the class is what dataclasses makes without the cache
    for cls in (Point, Again):
        p = cls(1)
        assert (p.x, p.y) == (1, 2) and p == cls(1, 2) and p != cls(1, 3) and hash(p) == hash(cls(1, 2))
        assert repr(p) == "make_class.<locals>.Point(x=1, y=2)"
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.x = 5  # type: ignore[misc]


def test_nothing_written_once_a_vm_started(monkeypatch):
    start_up.begin()
    start_up.vm_starting()  # nothing new yet: nothing written
    make_class()  # a class made while the VM runs (its seccomp filter allows no new files)
    start_up._codes.save()  # what the exit handler does
    assert not os.path.exists(start_up.code_file())


def test_a_command_without_a_vm_keeps_its_code_at_exit():
    start_up.begin()
    start_up.end()
    make_class()
    start_up._codes.save()  # what the exit handler does
    assert os.path.exists(start_up.code_file())


def written_cache() -> str:
    start_up.begin()
    make_class()
    start_up._codes.save()
    return start_up.code_file()


@pytest.mark.parametrize("damage", ["group writable", "other writable", "corrupt", "wrong magic", "wrong types",
                                    "symlink"])
def test_an_unusable_cache_file_means_compiling(damage, tmp_path):
    path = written_cache()
    magic = importlib.util.MAGIC_NUMBER
    if damage == "group writable":
        os.chmod(path, 0o620)
    elif damage == "other writable":
        os.chmod(path, 0o602)
    elif damage == "corrupt":
        with open(path, "r+b") as f:
            f.truncate(len(magic) + 100)
    elif damage == "wrong magic":
        with open(path, "r+b") as f:
            f.write(b"\0\0\0\0")
    elif damage == "wrong types":
        with open(path, "wb") as f:
            f.write(magic + marshal.dumps({"source": "not code"}))
    else:
        os.replace(path, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", path)
    assert start_up._read(path) == {}
    # and a process meeting it still makes its classes
    fresh = start_up._CodeCache()
    fresh.install()
    assert make_class()(1).y == 2


def test_processes_add_to_the_cache_each_other_wrote():
    first = start_up._CodeCache()
    first.install()
    namespace = {"__name__": start_up.CACHED_MODULES}
    first._exec("x = 1", namespace, namespace)  # reads the (empty) file, compiles one
    second = start_up._CodeCache()
    second.install()  # the dataclasses hook is second's now
    make_class()
    second.save()
    saved = set(start_up._read(start_up.code_file()))
    assert saved and saved == set(second._codes)
    first.save()  # what the second wrote stays
    assert set(start_up._read(start_up.code_file())) == saved | {"x = 1"}


def test_the_cache_starts_again_past_its_bound(monkeypatch):
    monkeypatch.setattr(start_up, "_MAX_CODES", 2)
    path = written_cache()  # a frozen dataclass: more than two functions
    assert start_up._read(path) == {}


def test_only_pyvmms_own_classes_are_cached(monkeypatch):
    """A program using pyvmm as a library: its classes compile as usual, nothing of them is kept."""
    monkeypatch.setattr(start_up, "CACHED_MODULES", "pyvmm.")
    start_up.cache_dataclass_code()
    assert make_class()(1).y == 2
    assert not start_up._codes._codes and start_up._codes._new == 0
    start_up._codes.save()
    assert not os.path.exists(start_up.code_file())
    exec_ = vars(dataclasses)["exec"]  # as dataclasses calls it for a class of a pyvmm module
    namespace = {"__name__": "pyvmm.some_module"}
    exec_("def f(): return 1", namespace, namespace)
    assert namespace["f"]() == 1 and list(start_up._codes._codes) == ["def f(): return 1"]


def test_a_library_process_keeps_its_code_when_a_vm_starts_and_never_after():
    start_up.cache_dataclass_code()  # `import pyvmm`, no begin()
    make_class()
    frozen = gc.get_freeze_count()
    start_up.vm_starting()
    assert os.path.exists(start_up.code_file()) and gc.get_freeze_count() == frozen
    os.unlink(start_up.code_file())
    make_class()
    start_up._codes.save()  # what the exit handler does
    assert not os.path.exists(start_up.code_file())


EXITING = """
import atexit, os, sys, threading, time
from pyvmm import start_up
atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
sys.stdout.write("buffered, no newline")  # a pipe: block-buffered until flushed
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # does not hold the exit
if sys.argv[2] == "worker":
    threading.Thread(target=lambda: (time.sleep(0.3), open(sys.argv[1] + ".worker", "w").write("done"))).start()
start_up.exit_process(5)
"""


@pytest.mark.parametrize("threads", ["daemon only", "worker"])
def test_exit_process_runs_the_exit_handlers_flushes_and_keeps_the_status(tmp_path, threads):
    marker = tmp_path / "marker"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", EXITING, str(marker), threads.split()[0]], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 5 and done.stdout == "buffered, no newline" and done.stderr == ""
    assert marker.read_text() == "atexit ran"
    assert time.monotonic() - started < 30  # the sleeping daemon thread did not hold it
    if threads == "worker":  # a non-daemon thread still running: the interpreter's exit, which waits for it
        assert (tmp_path / "marker.worker").read_text() == "done"
