"""A pyvmm process's start-up made cheaper: dataclass code compiled once; the heap frozen.

Starting a VM from the command line (imports, the machine built, the kernel loaded) takes
several times as long as QEMU's start-up (benchmarks/start_up.py). What this module saves of it
and after it:

- Compiling the methods `dataclasses` writes as source text for each class (about 100 classes,
  550 functions: a good part of start-up's imports). `import pyvmm` has the dataclasses module
  compile pyvmm's own classes through a cache of the code objects by their source text, kept in
  the user's cache per Python version like a .pyc: the same text compiles to the same code, so
  a class behaves exactly as without the cache. Other classes (a program's that uses pyvmm as a
  library) compile as without it. The file is read when the first of pyvmm's classes is made.
  The file is code pyvmm runs, so it is read only when the process's own user owns it and
  nobody else may write to it; anything unexpected in it means compiling as before. The cache
  is saved (at exit, or when a VM starts) and let go when the first VM starts, and never
  written after that (the VM's seccomp filter may forbid the calls).
- The collector's passes, while the VM runs and at exit, over the objects start-up made, nearly
  all of which live as long as the process. In a process whose entry point called begin() (the
  CLI, a managed VM's process, the Firecracker launcher), Vm.start() calls vm_starting(), which
  collects the young generations once (start-up's recent garbage) and moves everything left
  out of the collector's sight for good (gc.freeze: later passes, the last one at exit among
  them, look only at what the run makes). Collection during start-up itself stays as it was:
  deferring it kept the software CPU probes' scratch engines alive together (more peak memory)
  for a gain lost in the noise.

Library users never call begin(): their collector is left alone.
"""

from __future__ import annotations

import atexit
import builtins
import dataclasses
import gc
import importlib.util
import marshal
import os
import stat
import sys
import threading
from pathlib import Path
from types import CodeType
from typing import NoReturn

from .user_cache import store, user_cache

_MAX_CODE_FILE = 8 << 20
_MAX_CODES = 4096
_began = False


def cache_dataclass_code() -> None:
    """pyvmm's own dataclasses compile through the code cache from now on (`import pyvmm` calls
    it; idempotent). Other classes compile as they would without it."""
    _codes.install()


def begin() -> None:
    """A process that will start a VM: its heap frozen when the VM starts (idempotent)."""
    global _began
    _began = True
    _codes.install()


def end() -> None:
    """The entry point is done (its main returned in a process that goes on): a VM started later
    in this process is a library user's."""
    global _began
    _began = False


def exit_process(status: int) -> NoReturn:
    """End this process with `status` now: what the interpreter's exit does that anyone sees
    (the atexit handlers: a tap=auto NIC's namespace removed, the terminal's mode restored,
    caches saved; buffered output flushed), without the rest (freeing every module and object
    one by one, several milliseconds after a VM's run). Where another non-daemon thread still
    runs, the interpreter's exit, which waits for it."""
    main = threading.main_thread()
    if any(thread is not main and not thread.daemon and thread.is_alive() for thread in threading.enumerate()):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed pipe or stream, or none (as at exit)
            pass
    os._exit(status)


def vm_starting() -> None:
    """Start-up is over: its garbage collected, the rest frozen out of later collections, and
    dataclass code compiled so far kept for the next run. Only after begin(); but after any VM
    starts, the cache is never written again: the VM's seccomp filter may forbid the calls."""
    global _began
    began, _began = _began, False
    if began:
        # The young generations only: a full pass walks every object start-up made, and found
        # no more than a handful of objects (a help formatter, a ctypes function) beyond them.
        gc.collect(1)
        gc.freeze()
    _codes.save(last=True)  # (before the VM's seccomp filter, if it has one, goes in)


def code_file() -> str:
    return os.fspath(user_cache("dataclass-code", f"{sys.implementation.cache_tag}.marshal"))


# The classes whose code is cached: pyvmm's (a program using pyvmm as a library has its own
# classes compiled as Python compiles them, and none of its code in pyvmm's cache file).
CACHED_MODULES = "pyvmm."


class _CodeCache:
    """The code objects of dataclass-generated functions, by source text."""

    def __init__(self) -> None:
        self._codes: dict[str, CodeType] | None = None  # None: the file not read yet
        self._new = 0
        self._installed = False
        self._saved_for_good = False
        self._path = ""
        self._lock = threading.Lock()

    def install(self) -> None:
        if self._installed or self._saved_for_good:
            return
        self._installed = True
        # dataclasses compiles with the builtin exec, looked up in its module's globals first
        dataclasses.exec = self._exec  # type: ignore[attr-defined]
        atexit.register(self.save)

    def _exec(self, source, globals=None, locals=None) -> None:
        # (dataclasses passes the class's module's namespace as the globals)
        if isinstance(source, str) and str((globals or {}).get("__name__", "")).startswith(CACHED_MODULES):
            with self._lock:
                if self._codes is None:  # read at the first class to make: `import pyvmm` alone reads nothing
                    try:
                        self._path = code_file()
                    except RuntimeError:  # no home directory (e.g. a jailed VM's user): nowhere to keep it
                        self._path = ""
                    self._codes = _read(self._path) if self._path else {}
                code = self._codes.get(source)
            if code is None:
                # exec(text) in the dataclasses module inherits no __future__ flags: neither may this
                code = compile(source, "<string>", "exec", dont_inherit=True)
                with self._lock:
                    if self._codes is not None:
                        self._codes[source] = code
                        self._new += 1
            source = code
        builtins.exec(source, globals, locals)

    def save(self, last: bool = False) -> None:
        """Write the cache if this process compiled anything new. `last`: never again after this
        (a VM is starting: its seccomp filter, if it has one, would kill the process for the file
        calls)."""
        with self._lock:
            changed = bool(self._new) and bool(self._path) and not self._saved_for_good
            self._saved_for_good |= last
            self._new = 0
            codes = dict(self._codes or {}) if changed else {}
            if last:  # nothing to keep them for: a few MiB back, classes made later compile as usual
                self._codes = {}
                if vars(dataclasses).get("exec") == self._exec:
                    del dataclasses.exec  # type: ignore[attr-defined]
        if not changed:
            return
        # with what other processes added since this one read the file
        codes = {**_read(self._path), **codes}
        # past the bound (the classes of many versions of pyvmm): start again from nothing
        _write(self._path, codes if len(codes) <= _MAX_CODES else {})


def _read(path: str) -> dict[str, CodeType]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        info = os.fstat(fd)
        if (info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                or not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_CODE_FILE):
            return {}
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError:
        return {}
    finally:
        os.close(fd)
    magic = importlib.util.MAGIC_NUMBER
    if not data.startswith(magic):
        return {}
    try:
        codes = marshal.loads(memoryview(data)[len(magic):])  # (no copy of the file's bytes)
    except (ValueError, EOFError, TypeError):
        return {}
    if not isinstance(codes, dict) or not all(isinstance(k, str) and isinstance(v, CodeType) for k, v in codes.items()):
        return {}
    return codes


def _write(path: str, codes: dict[str, CodeType]) -> None:
    try:
        store(Path(path), importlib.util.MAGIC_NUMBER + marshal.dumps(codes))
    except OSError:
        pass


_codes = _CodeCache()
