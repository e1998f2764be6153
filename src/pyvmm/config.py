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


TRANSPORTS = ("pci", "mmio")
DEFAULT_TRANSPORT = "pci"


def _options(text: str, what: str, flags: tuple[str, ...], keys: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Split 'a,b,key=value' into bare words and key=value pairs, rejecting unknown ones."""
    words, pairs = [], {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if eq:
            if key not in keys:
                raise ConfigError(f"{what}: unknown option {key!r} (known: {', '.join(keys)})")
            pairs[key] = value
        elif words and part not in flags:
            raise ConfigError(f"{what}: unknown flag {part!r} (known: {', '.join(flags)})")
        else:
            words.append(part)
    transport = pairs.get("transport", DEFAULT_TRANSPORT)
    if "transport" in keys and transport not in TRANSPORTS:
        raise ConfigError(f"{what}: transport must be pci or mmio (got {transport!r})")
    return words, pairs


def parse_transport(text: str, what: str) -> str:
    """The transport= of an option string that takes nothing else ('' or 'transport=mmio')."""
    words, pairs = _options(text, what, (), ("transport",))
    if words:
        raise ConfigError(f"{what}: unexpected {words[0]!r} (only transport=pci|mmio)")
    return pairs.get("transport", DEFAULT_TRANSPORT)


@dataclass
class DiskConfig:
    path: str | None = None             # raw image (None for a vhost-user disk)
    readonly: bool = False
    serial: str | None = None
    transport: str = DEFAULT_TRANSPORT
    vhost_user: str | None = None       # vhost-user-blk back-end socket

    @classmethod
    def parse(cls, text: str) -> "DiskConfig":
        """--disk PATH[,readonly][,serial=ID][,transport=pci|mmio] or --disk vhost-user=SOCKET[,...]"""
        words, pairs = _options(text, "--disk", ("readonly", "ro"), ("serial", "transport", "vhost-user"))
        path = words[0] if words and words[0] not in ("readonly", "ro") else None
        flags = words[1:] if path else words
        if path is None and "vhost-user" not in pairs:
            raise ConfigError("--disk needs an image path (or vhost-user=SOCKET)")
        if path is not None and "vhost-user" in pairs:
            raise ConfigError("--disk: give an image path or vhost-user=SOCKET, not both")
        serial = pairs.get("serial")
        if serial is not None and len(serial.encode()) > 20:
            raise ConfigError(f"--disk serial {serial!r} is longer than 20 bytes")
        return cls(path, bool(flags), serial, pairs.get("transport", DEFAULT_TRANSPORT), pairs.get("vhost-user"))


_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


@dataclass
class NetConfig:
    tap: str = "auto"                   # a TAP name, or auto: pyvmm creates one in a new network namespace
    mac: str | None = None
    transport: str = DEFAULT_TRANSPORT

    @classmethod
    def parse(cls, text: str) -> "NetConfig":
        """--net tap=NAME|auto[,mac=52:54:00:..][,transport=pci|mmio]"""
        words, pairs = _options(text, "--net", (), ("tap", "mac", "transport"))
        if words:
            raise ConfigError(f"--net: expected key=value options, got {words[0]!r}")
        mac = pairs.get("mac")
        if mac is not None and (not _MAC.match(mac) or int(mac[:2], 16) & 1):
            raise ConfigError(f"--net mac {mac!r} is not a unicast MAC address like 52:54:00:12:34:56")
        return cls(pairs.get("tap", "auto") or "auto", mac, pairs.get("transport", DEFAULT_TRANSPORT))


@dataclass
class VsockConfig:
    cid: int
    uds: str
    transport: str = DEFAULT_TRANSPORT

    @classmethod
    def parse(cls, text: str) -> "VsockConfig":
        """--vsock cid=N,uds=PATH[,transport=pci|mmio]"""
        words, pairs = _options(text, "--vsock", (), ("cid", "uds", "transport"))
        if words or "cid" not in pairs or "uds" not in pairs:
            raise ConfigError("--vsock needs cid=N,uds=PATH")
        try:
            cid = int(pairs["cid"], 0)
        except ValueError:
            raise ConfigError(f"--vsock cid {pairs['cid']!r} is not a number") from None
        if not 3 <= cid < 0xFFFFFFFF:
            raise ConfigError(f"--vsock cid {cid}: guest CIDs start at 3 (0-2 are reserved)")
        return cls(cid, pairs["uds"], pairs.get("transport", DEFAULT_TRANSPORT))


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
    disks: list[DiskConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    vsock: VsockConfig | None = None
    rng: str | None = None              # None, or the transport of a virtio-rng
    console: str = "serial"             # serial (COM1) | virtio (hvc0; COM1 stays for early messages)
    console_transport: str = DEFAULT_TRANSPORT
    console_ports: list[tuple[str, str]] = field(default_factory=list)  # virtio-console (name, unix socket)
    system_map: str | None = None       # the kernel's System.map (or kallsyms): names guest code in errors

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
        if self.console not in ("serial", "virtio"):
            raise ConfigError(f"--console must be serial or virtio (got {self.console!r})")
        if self.rng is not None and self.rng not in TRANSPORTS:
            raise ConfigError(f"--rng transport must be pci or mmio (got {self.rng!r})")
        CpuidPolicy(set(self.cpu_hide))  # an unknown feature name fails here, before KVM is opened
        if self.system_map is not None:
            from .loader.linux.symbols import LazySymbolTable

            LazySymbolTable(self.system_map).check()
