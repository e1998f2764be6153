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
