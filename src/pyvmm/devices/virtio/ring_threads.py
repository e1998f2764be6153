"""What virtio-net's two ring threads share on the Python side (ring_thread.h, the C side):
the switch that allows them, and the report each hands the I/O thread."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ...compiled import c_module
from ...errors import ConfigError


def allowed(env: str, module: str, on: str, off: str, *, default: bool = True,
            environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `env` ("1", "0", or "" for `default`) allows the thread and its C `module` is
    built; `on` and `off` say what each setting does, for the error a bad value gets."""
    text = environ.get(env, "").strip()
    if text not in ("", "0", "1"):
        choices = (f"1 (the default: {on}) or 0 ({off})" if default else f"0 (the default: {off}) or 1 ({on})")
        raise ConfigError(f"{env}={text}: {choices}")
    return (default if text == "" else text == "1") and c_module(module) is not None


@dataclass
class Report:
    """What a thread did since the last report."""
    frames: int
    bytes: int
    dropped: int
    stopped: str | None    # why it stopped by itself; None while it serves
