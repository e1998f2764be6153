"""The per-user cache: $XDG_CACHE_HOME/pyvmm (by default ~/.cache/pyvmm).

A relative XDG_CACHE_HOME is ignored, as the XDG base directory specification asks.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path:
    """A path under pyvmm's cache directory (not created here)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base.joinpath("pyvmm", *parts)


def store(path: Path, data: bytes) -> None:
    """Replace the cache file `path` with `data` (mode 0600), creating its directory if missing.
    Readers see the old file or the new one, never half of one. Raises OSError."""
    import tempfile

    if not path.parent.is_dir():  # (only then: once a VM runs, its seccomp filter may forbid mkdir)
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
