"""VmConfig: everything needed to build a VM, validated with one-line errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .arch.x86_64 import layout
from .arch.x86_64.cpuid import CpuidPolicy


class ConfigError(ValueError):
    """Bad user input; the message is one line fit to print."""


_SIZE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])(?:i?B)?|(B))?\s*$", re.IGNORECASE)
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'256M', '1GiB', '64k', '4096B' (bytes), '512' (MiB when no unit) -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"invalid size {text!r}: use e.g. 256M or 2G")
    number, prefix, bytes_suffix = match.groups()
    if bytes_suffix:
        return int(number)
    return int(number) * (_UNITS[prefix.upper()] if prefix else 1 << 20)


@dataclass
class VmConfig:
    kernel: str | None = None
    initrd: str | None = None
    boot: str = "auto"  # Linux: pvh (extract the vmlinux, boot it directly) | bzimage | auto (PVH when possible)
    cmdline: str = ""
    memory: int = 256 << 20
    cpus: int = 1
    modules: list[str] = field(default_factory=list)
    flat_address: int | None = None
    flat_64bit: bool = False
    cpu_hide: set[str] = field(default_factory=set)
    console_log: str | None = None
    reboot: bool = False
    timeout: float | None = None
    accel: str = "auto"

    def validate(self, max_vcpus: int | None = None) -> None:
        if self.memory <= 0:
            raise ConfigError(f"--memory must be positive (got {self.memory} bytes)")
        if self.memory < layout.MIN_MEMORY:
            raise ConfigError(f"--memory must be at least {layout.MIN_MEMORY >> 20}M")
        if self.memory % 4096:
            raise ConfigError("--memory must be a multiple of 4 KiB")
        if self.cpus < 1:
            raise ConfigError(f"--cpus must be at least 1 (got {self.cpus})")
        if max_vcpus is not None and self.cpus > max_vcpus:
            raise ConfigError(f"--cpus {self.cpus}: this host allows at most {max_vcpus} vCPUs")
        if self.cpus > 255:
            raise ConfigError("--cpus: pyvmm supports at most 255 vCPUs (xAPIC IDs)")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        if self.boot not in ("auto", "pvh", "bzimage"):
            raise ConfigError(f"--boot must be one of auto, pvh, bzimage (got {self.boot!r})")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"--accel must be one of auto, kvm, tcg (got {self.accel!r})")
        CpuidPolicy(set(self.cpu_hide))  # an unknown feature name fails here, before KVM is opened
