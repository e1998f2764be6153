"""What the software CPU found out about the installed libunicorn, remembered per build.

Finding Unicorn's private offsets (private_state.py, engine_state.py) and its CPUID
(cpuid.py) runs probe guests on scratch engines: about 60 ms at every start of pyvmm, a
fortieth of a Linux boot. The answers depend only on the libunicorn binary, so they are kept
in $XDG_CACHE_HOME/pyvmm/tcg/, one file per build (named by the library file's device, inode,
size and modification time, and this format's version). Offsets read from the file are verified by use
before they are trusted (about 1 ms each), and found again if they fail. The cache is only an
optimisation: if it cannot be read or written, pyvmm probes as before.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, TypeVar

from ...user_cache import store, user_cache

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is stored, or how it is found, changes
T = TypeVar("T")


def _build_key() -> str | None:
    try:
        from unicorn.unicorn_py3.unicorn import uclib

        st = os.stat(uclib._name)
    except (ImportError, OSError, TypeError, AttributeError):
        return None  # no unicorn (the probe reports it) or no file to name the build by
    # the library file as the kernel knows it (no digest: hashlib's OpenSSL start costs every run)
    return f"{FORMAT}-{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _path():
    key = _build_key()
    return None if key is None else user_cache("tcg", f"unicorn-{key}.json")


def _load(path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(path, name: str, value) -> None:
    data = _load(path)
    data[name] = value
    try:
        store(path, json.dumps(data).encode())
    except OSError as exc:
        log.debug("cannot cache Unicorn probe results in %s: %s", path.parent, exc)


def remembered(name: str, find: Callable[[], T], *, to_json: Callable[[T], object],
               from_json: Callable[[Any], T], verify: Callable[[T], None] | None = None) -> T:
    """`find()`'s answer for this libunicorn build: from the cache if it is there (and passes
    `verify`, which raises if it does not hold), else found now and stored."""
    path = _path()
    if path is not None:
        stored = _load(path).get(name)
        if stored is not None:
            try:
                value = from_json(stored)
                if verify is not None:
                    verify(value)
                return value
            except Exception as exc:  # a stale or damaged entry: find it again
                log.debug("cached Unicorn probe %s not usable (%s): probing again", name, exc)
    value = find()
    if path is not None:
        _store(path, name, to_json(value))
    return value
