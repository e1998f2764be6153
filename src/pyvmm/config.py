"""The machine description and the options of one run, as data, with field-named errors.

MachineConfig is what a definition file or a snapshot describes: CPUs, memory, the kernel
and the devices. RunOptions is how one run goes: accelerator, timeout, reboot policy,
console log, symbols for error messages. Both are frozen: code that needs a variant makes
one with dataclasses.replace(), the caller's object never changes.

Every ConfigError names the field it is about ("memory", "disks[1].serial", "vsock.cid");
front ends map the field to their own name for it (the CLI to its flags).
The parse() class methods read the compact option syntax the CLI uses
("a.img,readonly,serial=s1"); validate() checks the values however they were made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .arch.x86_64 import layout
from .arch.x86_64.cpuid import CpuidPolicy, UnknownFeature
from .arch.x86_64.numa import NumaNode, parse_cpu_list, validate_topology
from .devices.rate_limiter import RateLimit
from .errors import ConfigError

__all__ = ["BalloonConfig", "ConfigError", "ConsolePort", "DiskConfig", "MachineConfig", "NetConfig", "RateLimit", "RunOptions",
           "VsockConfig", "NumaNode", "parse_numa_node", "TRANSPORTS", "DEFAULT_TRANSPORT", "parse_rate", "parse_size",
           "parse_transport"]

def default_mac(index: int) -> str:
    """The MAC of NIC `index` when its configuration names none: 52:54:00:12:34:(0x56 + index)."""
    return f"52:54:00:12:34:{0x56 + index:02x}"


_SIZE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])(?:i?B)?|(B))?\s*$", re.IGNORECASE)
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, field: str | None = None) -> int:
    """'256M', '1GiB', '64k', '4096B' (bytes), '512' (MiB when no unit) -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{': ' if field else ''}invalid size {text!r}: use e.g. 256M or 2G", field)
    number, prefix, bytes_suffix = match.groups()
    if bytes_suffix:
        return int(number)
    return int(number) * (_UNITS[prefix.upper()] if prefix else 1 << 20)


_RATE = re.compile(r"^\s*(\d+)\s*([KMG]?)\s*$", re.IGNORECASE)


def parse_rate(text: str, field: str) -> int:
    """'10M' (10 MiB), '500k', '100' -> units per second (a rate limit's compact form; 0 is no limit)."""
    match = _RATE.match(str(text))
    if not match:
        raise ConfigError(f": invalid rate {text!r}: use a number, optionally with K, M or G", field)
    number, prefix = match.groups()
    return int(number) * (_UNITS[prefix.upper()] if prefix else 1)


def _rate_limit(pairs: dict[str, str], field: str, prefix: str = "") -> RateLimit | None:
    """bps= and iops=/pps= options -> a one-second RateLimit (None when neither is given)."""
    nbytes = pairs.get(f"{prefix}bps")
    ops = pairs.get(f"{prefix}iops", pairs.get(f"{prefix}pps"))
    return RateLimit.per_second(parse_rate(nbytes, f"{field}.{prefix}bps") if nbytes is not None else None,
                                parse_rate(ops, f"{field}.{prefix}ops") if ops is not None else None)


def parse_numa_node(text: str, field: str = "numa") -> NumaNode:
    """One guest NUMA node: cpus=LIST,mem=SIZE[,distances=D0:D1:...][,host_node=N], LIST like 0-1,3
    (or 0-1;3); distances: to node 0, 1, ... (default 10 to itself, 20 to the others); host_node:
    bind its memory and vCPU threads to that host node (default: node i where the host has enough)."""
    pairs: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in ("cpus", "mem", "memory", "distances", "host_node"):
            if eq or not pairs.get("cpus") or not re.fullmatch(r"\d+(-\d+)?", part):
                raise ConfigError(f": {part!r} is not cpus=LIST, mem=SIZE, distances=D:D:... or host_node=N (in {text!r})",
                                  field)
            pairs["cpus"] += ";" + part  # cpus=0-1,3: the list went on after a comma
            continue
        pairs["mem" if key == "memory" else key] = value
    if "mem" not in pairs:
        raise ConfigError(f": mem=SIZE is missing (in {text!r})", field)
    cpus = parse_cpu_list(pairs.get("cpus", ""), field)
    distances = None
    if "distances" in pairs:
        items = pairs["distances"].split(":")
        if not all(item.isascii() and item.isdigit() for item in items):
            raise ConfigError(f": distances must be numbers separated by ':' (got {pairs['distances']!r})", field)
        distances = tuple(int(item) for item in items)
    host_node = pairs.get("host_node")
    if host_node is not None and not (host_node.isascii() and host_node.isdigit()):
        raise ConfigError(f": host_node must be a host NUMA node number (got {host_node!r})", field)
    return NumaNode(cpus, parse_size(pairs["mem"], field), distances, None if host_node is None else int(host_node))


# virtio-mem: Linux adds hotplugged memory in memory blocks (128 MiB on x86-64), so the region
# is whole blocks; the device's own block (what one plug request moves) is 2 MiB, as QEMU's.
VIRTIO_MEM_ALIGN = 128 << 20
VIRTIO_MEM_MAX = 1 << 40
VIRTIO_MEM_BLOCK = 2 << 20

TRANSPORTS = ("pci", "mmio")
DEFAULT_TRANSPORT = "pci"


def _options(text: str, field: str, flags: tuple[str, ...], keys: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Split 'a,b,key=value' into bare words and key=value pairs, rejecting unknown ones."""
    words: list[str] = []
    pairs: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if eq:
            if key not in keys:
                raise ConfigError(f": unknown option {key!r} (known: {', '.join(keys)})", field)
            pairs[key] = value
        elif words and part not in flags:
            raise ConfigError(f": unknown flag {part!r} (known: {', '.join(flags)})", field)
        else:
            words.append(part)
    return words, pairs


def _check_transport(transport: str, field: str) -> None:
    if transport not in TRANSPORTS:
        what = "" if field.endswith(".transport") else "transport "  # console_transport: "--console transport"
        raise ConfigError(f"{what}must be pci or mmio (got {transport!r})", field)


def parse_transport(text: str, field: str = "console_transport") -> str:
    """The transport= of an option string that takes nothing else ('' or 'transport=mmio')."""
    words, pairs = _options(text, field, (), ("transport",))
    if words:
        raise ConfigError(f": unexpected {words[0]!r} (only transport=pci|mmio)", field)
    transport = pairs.get("transport", DEFAULT_TRANSPORT)
    _check_transport(transport, field)
    return transport


@dataclass(frozen=True)
class DiskConfig:
    path: str | None = None             # raw image (None for a vhost-user disk)
    readonly: bool = False
    serial: str | None = None
    transport: str = DEFAULT_TRANSPORT
    vhost_user: str | None = None       # vhost-user-blk back-end socket
    rate_limit: RateLimit | None = None  # bytes and requests (virtio-blk only)
    id: str | None = None               # its device-tree id (default virtio-blkN, N its index)

    @classmethod
    def parse(cls, text: str, field: str = "disks") -> "DiskConfig":
        """PATH[,readonly][,serial=ID][,transport=pci|mmio][,bps=RATE][,iops=N] or vhost-user=SOCKET[,...]"""
        words, pairs = _options(text, field, ("readonly", "ro"), ("serial", "transport", "vhost-user", "bps", "iops"))
        path = words[0] if words and words[0] not in ("readonly", "ro") else None
        flags = words[1:] if path else words
        disk = cls(path, bool(flags), pairs.get("serial"), pairs.get("transport", DEFAULT_TRANSPORT),
                   pairs.get("vhost-user"), _rate_limit(pairs, field))
        disk.validate(field)
        return disk

    def validate(self, field: str = "disks") -> None:
        if self.path is None and self.vhost_user is None:
            raise ConfigError("needs an image path (or vhost-user=SOCKET)", field)
        if self.path is not None and self.vhost_user is not None:
            raise ConfigError(": give an image path or vhost-user=SOCKET, not both", field)
        if self.vhost_user is not None and self.rate_limit is not None:
            raise ConfigError(": a vhost-user disk's I/O is its back-end's: pyvmm cannot rate-limit it", field)
        if self.serial is not None and len(self.serial.encode()) > 20:
            raise ConfigError(f"{self.serial!r} is longer than 20 bytes", f"{field}.serial")
        _check_transport(self.transport, f"{field}.transport")
        _check_id(self.id, f"{field}.id")


_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")   # the API's drive and interface ids


def _check_id(device_id: str | None, field: str) -> None:
    if device_id is not None and not _ID.match(device_id):
        raise ConfigError(f"{device_id!r} is not a device id (1-64 letters, digits, '_', '.', '-')", field)


_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


@dataclass(frozen=True)
class NetConfig:
    tap: str = "auto"                   # a TAP name, or auto: pyvmm creates one in a new network namespace
    mac: str | None = None
    transport: str = DEFAULT_TRANSPORT
    rx_rate_limit: RateLimit | None = None   # bytes and packets the guest receives
    tx_rate_limit: RateLimit | None = None   # bytes and packets the guest sends
    id: str | None = None               # its device-tree id (default virtio-netN, N its index)

    @classmethod
    def parse(cls, text: str, field: str = "nets") -> "NetConfig":
        """tap=NAME|auto[,mac=52:54:00:..][,transport=pci|mmio][,rx-bps=RATE][,rx-pps=N][,tx-bps=RATE][,tx-pps=N]"""
        words, pairs = _options(text, field, (), ("tap", "mac", "transport", "rx-bps", "rx-pps", "tx-bps", "tx-pps"))
        if words:
            raise ConfigError(f": expected key=value options, got {words[0]!r}", field)
        net = cls(pairs.get("tap", "auto") or "auto", pairs.get("mac"), pairs.get("transport", DEFAULT_TRANSPORT),
                  _rate_limit(pairs, field, "rx-"), _rate_limit(pairs, field, "tx-"))
        net.validate(field)
        return net

    def validate(self, field: str = "nets") -> None:
        mac = self.mac
        if mac is not None and (not _MAC.match(mac) or int(mac[:2], 16) & 1):
            raise ConfigError(f"{mac!r} is not a unicast MAC address like 52:54:00:12:34:56", f"{field}.mac")
        _check_transport(self.transport, f"{field}.transport")
        _check_id(self.id, f"{field}.id")


@dataclass(frozen=True)
class VsockConfig:
    cid: int
    uds: str
    transport: str = DEFAULT_TRANSPORT

    @classmethod
    def parse(cls, text: str, field: str = "vsock") -> "VsockConfig":
        """cid=N,uds=PATH[,transport=pci|mmio]"""
        words, pairs = _options(text, field, (), ("cid", "uds", "transport"))
        if words or "cid" not in pairs or "uds" not in pairs:
            raise ConfigError("needs cid=N,uds=PATH", field)
        try:
            cid = int(pairs["cid"], 0)
        except ValueError:
            raise ConfigError(f"{pairs['cid']!r} is not a number", f"{field}.cid") from None
        vsock = cls(cid, pairs["uds"], pairs.get("transport", DEFAULT_TRANSPORT))
        vsock.validate(field)
        return vsock

    def validate(self, field: str = "vsock") -> None:
        if not 3 <= self.cid < 0xFFFFFFFF:
            raise ConfigError(f"{self.cid}: guest CIDs start at 3 (0-2 are reserved)", f"{field}.cid")
        _check_transport(self.transport, f"{field}.transport")


@dataclass(frozen=True)
class BalloonConfig:
    """A virtio-balloon: its initial target (MiB taken from the guest) and features."""
    amount_mib: int = 0
    deflate_on_oom: bool = False
    stats_interval_s: int = 0           # seconds between guest statistics updates, 0: never
    free_page_reporting: bool = False
    transport: str = DEFAULT_TRANSPORT

    @classmethod
    def parse(cls, text: str, field: str = "balloon") -> "BalloonConfig":
        """[amount=MIB][,deflate-on-oom][,free-page-reporting][,stats=SECONDS][,transport=pci|mmio]"""
        flags = ("deflate-on-oom", "free-page-reporting", "on")
        words, pairs = _options("on," + text, field, flags, ("amount", "stats", "transport"))
        numbers = {}
        for key in ("amount", "stats"):
            try:
                numbers[key] = int(pairs.get(key, "0"))
            except ValueError:
                raise ConfigError(f"{pairs[key]!r} is not a number", f"{field}.{key}") from None
        balloon = cls(numbers["amount"], "deflate-on-oom" in words, numbers["stats"], "free-page-reporting" in words,
                      pairs.get("transport", DEFAULT_TRANSPORT))
        balloon.validate(field)
        return balloon

    def validate(self, field: str = "balloon", memory: int | None = None) -> None:
        if self.amount_mib < 0:
            raise ConfigError(f"{self.amount_mib}: the balloon's target cannot be negative", f"{field}.amount_mib")
        if memory is not None and self.amount_mib << 20 > memory:
            raise ConfigError(f"{self.amount_mib} MiB is more than the guest's {memory >> 20} MiB",
                              f"{field}.amount_mib")
        if not 0 <= self.stats_interval_s <= 0xFFFF:
            raise ConfigError(f"{self.stats_interval_s}: must be 0..65535 seconds", f"{field}.stats_interval_s")
        _check_transport(self.transport, f"{field}.transport")


@dataclass(frozen=True)
class ConsolePort:
    """A named virtio-console port whose host side is a Unix socket pyvmm listens on."""
    name: str
    socket: str

    @classmethod
    def parse(cls, text: str, field: str = "console_ports") -> "ConsolePort":
        """NAME=SOCKET_PATH"""
        name, eq, path = text.partition("=")
        if not eq or not name or not path:
            raise ConfigError(f"{text!r}: expected NAME=SOCKET_PATH", field)
        return cls(name, path)


@dataclass(frozen=True)
class MachineConfig:
    """The machine: what a definition file or a snapshot describes, whatever the run."""
    kernel: str | None = None
    initrd: str | None = None
    boot: str = "auto"  # Linux: pvh (extract the vmlinux, boot it directly) | bzimage | auto (PVH when possible)
    cmdline: str = ""
    memory: int = 256 << 20
    cpus: int = 1
    modules: tuple[str, ...] = ()
    flat_address: int | None = None
    flat_64bit: bool = False
    cpu_hide: frozenset[str] = frozenset()
    disks: tuple[DiskConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    vsock: VsockConfig | None = None
    rng: str | None = None              # None, or the transport of a virtio-rng
    console: str = "serial"             # serial (COM1) | virtio (hvc0; COM1 stays for early messages)
    console_transport: str = DEFAULT_TRANSPORT
    console_ports: tuple[ConsolePort, ...] = ()
    balloon: BalloonConfig | None = None
    huge_pages: str = "none"            # none | 2M (hugetlb pages) | transparent (THP): memory/backing.py
    ksm: bool = False                   # guest RAM mergeable by KSM
    numa: tuple[NumaNode, ...] = ()     # guest NUMA nodes (ACPI SRAT/SLIT); () for none
    virtio_mem_size: int = 0            # bytes of a virtio-mem region the guest may plug (0: no device)
    virtio_mem_transport: str = DEFAULT_TRANSPORT
    max_cpus: int | None = None         # CPU hotplug: vCPUs may be added up to this many (None: cpus, no hotplug)
    test_devices: bool = False          # QEMU's test-kernel devices: fw_cfg and pc-testdev (devices/legacy)

    @property
    def possible_cpus(self) -> int:
        """The vCPUs the machine may have (those it has, and those that may be plugged in)."""
        return self.max_cpus if self.max_cpus is not None else self.cpus

    def backing(self):
        from .memory.backing import Backing

        return Backing(self.huge_pages, self.ksm)

    def disk_id(self, index: int) -> str:
        """The device-tree id of disks[index]."""
        return self.disks[index].id or f"virtio-blk{index}"

    def net_id(self, index: int) -> str:
        """The device-tree id of nets[index]."""
        return self.nets[index].id or f"virtio-net{index}"

    def net_mac(self, index: int) -> str:
        """The MAC of nets[index]: its own, or default_mac(index)."""
        return self.nets[index].mac or default_mac(index)

    def validate(self, max_vcpus: int | None = None) -> None:
        if self.memory <= 0:
            raise ConfigError(f"must be positive (got {self.memory} bytes)", "memory")
        if self.memory < layout.MIN_MEMORY:
            raise ConfigError(f"must be at least {layout.MIN_MEMORY >> 20}M", "memory")
        if self.memory % 4096:
            raise ConfigError("must be a multiple of 4 KiB", "memory")
        if self.cpus < 1:
            raise ConfigError(f"must be at least 1 (got {self.cpus})", "cpus")
        if max_vcpus is not None and self.cpus > max_vcpus:
            raise ConfigError(f"{self.cpus}: this host allows at most {max_vcpus} vCPUs", "cpus")
        if self.cpus > 255:
            raise ConfigError(": pyvmm supports at most 255 vCPUs (xAPIC IDs)", "cpus")
        if self.max_cpus is not None and not self.cpus <= self.max_cpus <= 255:
            raise ConfigError(f"{self.max_cpus}: must be at least cpus ({self.cpus}) and at most 255", "max_cpus")
        if self.boot not in ("auto", "pvh", "bzimage"):
            raise ConfigError(f"must be one of auto, pvh, bzimage (got {self.boot!r})", "boot")
        if self.console not in ("serial", "virtio"):
            raise ConfigError(f"must be serial or virtio (got {self.console!r})", "console")
        _check_transport(self.console_transport, "console_transport")
        if self.rng is not None and self.rng not in TRANSPORTS:
            raise ConfigError(f"transport must be pci or mmio (got {self.rng!r})", "rng")
        for index, disk in enumerate(self.disks):
            disk.validate(f"disks[{index}]")
        for index, net in enumerate(self.nets):
            net.validate(f"nets[{index}]")
        ids = [self.disk_id(i) for i in range(len(self.disks))] + [self.net_id(i) for i in range(len(self.nets))]
        for index, device_id in enumerate(ids):
            if device_id in ids[:index]:
                where = f"disks[{index}]" if index < len(self.disks) else f"nets[{index - len(self.disks)}]"
                raise ConfigError(f"{device_id!r}: a device with that id exists already", f"{where}.id")
        if self.vsock is not None:
            self.vsock.validate("vsock")
        if self.balloon is not None:
            self.balloon.validate("balloon", self.memory)
        from .memory.backing import HUGE_PAGES

        if self.huge_pages not in HUGE_PAGES:
            raise ConfigError(f"must be one of {', '.join(HUGE_PAGES)} (got {self.huge_pages!r})", "huge_pages")
        if self.huge_pages == "2M" and self.ksm:
            raise ConfigError(": KSM cannot merge hugetlb pages (use huge_pages=transparent with ksm)", "ksm")
        if self.backing().anonymous and any(disk.vhost_user for disk in self.disks):
            raise ConfigError(": a vhost-user disk maps guest RAM by its memfd, which KSM and transparent huge "
                              "pages replace by private memory", "ksm" if self.ksm else "huge_pages")
        names = [port.name for port in self.console_ports]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ConfigError(f"{name!r}: a port of that name exists already", f"console_ports[{index}]")
        validate_topology(self.numa, self.cpus, self.memory)
        if self.virtio_mem_size < 0 or self.virtio_mem_size % VIRTIO_MEM_ALIGN or \
                self.virtio_mem_size > VIRTIO_MEM_MAX:
            raise ConfigError(f": must be a multiple of {VIRTIO_MEM_ALIGN >> 20}M up to {VIRTIO_MEM_MAX >> 30}G "
                              f"(got {self.virtio_mem_size >> 20}M)", "virtio_mem_size")
        _check_transport(self.virtio_mem_transport, "virtio_mem_transport")
        try:
            CpuidPolicy(set(self.cpu_hide))  # an unknown feature name fails here, before KVM is opened
        except UnknownFeature as exc:
            raise ConfigError(f": {exc}", "cpu_hide") from None


ACCELERATORS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class RunOptions:
    """How one run of a machine goes; none of it is part of the machine."""
    accel: str = "auto"
    timeout: float | None = None        # seconds for the whole run, reboots included
    reboot: bool = False                # restart the machine when the guest resets it
    console_log: str | None = None      # append the serial console to this file
    system_map: str | None = None       # the kernel's System.map (or kallsyms): names guest code in errors

    def validate(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("must be positive", "timeout")
        if self.accel not in ACCELERATORS:
            raise ConfigError(f"must be one of auto, kvm, tcg (got {self.accel!r})", "accel")
        if self.system_map is not None:
            from .loader.linux.symbols import LazySymbolTable

            LazySymbolTable(self.system_map).check()
