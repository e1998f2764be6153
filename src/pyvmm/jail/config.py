"""A jail's settings: `[pyvmm] jail = {...}` in a definition (or `pyvmm start --jail`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import ConfigError

UID_BASE = 200000          # automatically chosen uids/gids: UID_BASE + n, one per jailed VM
UID_SLOTS = 60000
VMM_OVERHEAD_MIB = 1024    # the memory limit's default: guest RAM + the VMM (Python, Unicorn, buffers)


@dataclass(frozen=True)
class JailConfig:
    uid: int | None = None          # None: a uid of its own, chosen at start
    gid: int | None = None          # None: the same number as the uid
    netns: bool = False             # a network namespace of its own (no host network then)
    cpus: float = 1.0               # CPU limit, in host cores
    memory_mib: int | None = None   # memory limit (None: guest RAM + VMM_OVERHEAD_MIB)
    pids: int = 512                 # tasks (Python threads count)
    nofile: int = 4096              # open files (RLIMIT_NOFILE)

    FIELDS: ClassVar[dict[str, Any]] = {"uid": int, "gid": int, "netns": bool, "cpus": (int, float),
                                        "memory_mib": int, "pids": int, "nofile": int}

    @classmethod
    def from_options(cls, options: Any, field: str = "pyvmm.jail") -> "JailConfig":
        if options is True:
            return cls()
        if not isinstance(options, dict):
            raise ConfigError(f"{field} must be true or a table of jail settings", field)
        values: dict[str, Any] = {}
        for key, value in options.items():
            kind = cls.FIELDS.get(key)
            if kind is None:
                raise ConfigError(f"{field}.{key}: unknown jail setting (known: {', '.join(cls.FIELDS)})",
                                  f"{field}.{key}")
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise ConfigError(f"{field}.{key} must be {'true or false' if kind is bool else 'a number'} "
                                  f"(got {value!r})", f"{field}.{key}")
            values[key] = value
        jail = cls(**values)
        for key in ("uid", "gid"):
            number = getattr(jail, key)
            if number is not None and not 0 < number < 2 ** 32 - 1:
                raise ConfigError(f"{field}.{key} must be an unprivileged id, not {number}", f"{field}.{key}")
        if not 0.01 <= jail.cpus <= 1024:
            raise ConfigError(f"{field}.cpus must be between 0.01 and 1024 cores (got {jail.cpus})", f"{field}.cpus")
        for key, low in (("memory_mib", 64), ("pids", 32), ("nofile", 64)):
            number = getattr(jail, key)
            if number is not None and number < low:
                raise ConfigError(f"{field}.{key} must be at least {low} (got {number})", f"{field}.{key}")
        return jail


def jail_options(document: dict[str, Any]) -> Any:
    """The definition's `[pyvmm] jail` value (None: not jailed)."""
    options = document.get("pyvmm") or {}
    value = options.get("jail") if isinstance(options, dict) else None
    return None if value is False else value
