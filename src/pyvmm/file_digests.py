"""The sha256 of files pyvmm reads at every start, remembered across runs while the file is unchanged.

`pyvmm run` checks the default guest's kernel, initramfs and System.map against its image's
manifest and finds the kernel's extracted vmlinux by the kernel's sha256: it hashed the 14 MiB
kernel twice and the others once at every start. A digest is remembered in
the user's cache (file-digests.json) under the file's absolute path with its device, inode, size,
mtime and ctime, and used again only while all five are the same. Every write to a file moves its
ctime, which nobody can set back (utimensat sets it to now), so a changed file is hashed again;
what the memo cannot see is a change below the filesystem (a disk's own corruption). A file
whose mtime or ctime is within the last few seconds is not remembered: a write in the same clock
tick as the hash would leave both times as they were (git's "racy" case).

The memo is best effort: an unreadable, corrupt or unwritable file only means hashing again.
"""

from __future__ import annotations

import json
import os
import time

from .user_cache import store, user_cache

MEMO_FILE = "file-digests.json"
MAX_ENTRIES = 128  # pyvmm's compiled sources, the default guest's files, a few kernels: the oldest go first
RACY_SECONDS = 3.0
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of the file at `path` (OSError if it cannot be read)."""
    return sha256_files([path])[0]


def sha256_files(paths: list[str | os.PathLike]) -> list[str]:
    """The hex sha256 of each file (OSError if one cannot be read); the memo read and written
    once for them all (pyvmm.compiled checks some thirty sources at every start)."""
    memo = _load()
    digests, learnt = [], False
    for path in paths:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            known = _known(memo, path, before)
            if known is not None:
                digests.append(known)
                continue
            import hashlib  # (here: OpenSSL's start costs every run that finds its digests remembered)

            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
            digests.append(digest.hexdigest())
            learnt |= _note(memo, path, before, os.fstat(f.fileno()), digests[-1])
    if learnt:
        _store(memo)
    return digests


def sha256_of_read(path: str | os.PathLike, before: os.stat_result, after: os.stat_result, data: bytes) -> str:
    """The hex sha256 of `data`, the whole file at `path` read between two fstat()s of it."""
    memo = _load()
    if _identity(before) == _identity(after):
        known = _known(memo, path, after)
        if known is not None:
            return known
    import hashlib

    hexdigest = hashlib.sha256(data).hexdigest()
    if _note(memo, path, before, after, hexdigest):
        _store(memo)
    return hexdigest


def known_sha256(path: str | os.PathLike, stat: os.stat_result) -> str | None:
    """The remembered sha256 of `path` if the file is the one `stat` describes; else None."""
    return _known(_load(), path, stat)


def _known(memo: dict[str, list], path: str | os.PathLike, stat: os.stat_result) -> str | None:
    entry = memo.get(_key(path))
    if entry is None or entry[:5] != _identity(stat):
        return None
    return entry[5]


def _note(memo: dict[str, list], path: str | os.PathLike, before: os.stat_result, after: os.stat_result,
          hexdigest: str) -> bool:
    """Remember `hexdigest` for `path` in `memo`, hashed between two fstat()s of it, if nothing
    changed the file in between and its times are old enough to be trusted; whether it took it."""
    identity = _identity(before)
    if identity != _identity(after):
        return False
    newest = max(after.st_mtime_ns, after.st_ctime_ns) / 1e9
    if time.time() - newest < RACY_SECONDS:
        return False
    key = _key(path)
    memo.pop(key, None)
    memo[key] = [*identity, hexdigest]
    while len(memo) > MAX_ENTRIES:
        memo.pop(next(iter(memo)))
    return True


def _key(path: str | os.PathLike) -> str:
    # absolute, not resolved (resolving links costs a system call per path component, and the
    # entry is checked against the file's identity anyway)
    return os.path.abspath(os.fsdecode(path))


def _identity(stat: os.stat_result) -> list:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _load() -> dict[str, list]:
    try:
        with open(user_cache(MEMO_FILE), encoding="utf-8") as f:
            memo = json.load(f)
    except (OSError, ValueError, RuntimeError):  # (RuntimeError: no home directory, e.g. a jailed VM's user)
        return {}
    if not isinstance(memo, dict):
        return {}
    return {key: entry for key, entry in memo.items()
            if isinstance(entry, list) and len(entry) == 6 and all(isinstance(v, int) for v in entry[:5])
            and isinstance(entry[5], str)}


def _store(memo: dict[str, list]) -> None:
    try:
        store(user_cache(MEMO_FILE), json.dumps(memo).encode())
    except (OSError, RuntimeError):
        pass
