"""Firecracker-shaped VM configuration, validated field by field.

One schema serves the per-VM API's request bodies, definition files (manage/) and the
OpenAPI document (openapi.py builds its component schemas from the tables below), so the
three cannot drift apart. Field names, types and limits are Firecracker's; pyvmm's own
options live in a separate "pyvmm" object.

Every error is a ConfigError naming the field as the document spells it
("mem_size_mib", "drives[0].path_on_host"): the API answers it as a 400, the CLI as one line.
Values pyvmm cannot honour (an entropy device's rate limiter, an SMT topology) are refused with
a message that says so, never accepted and silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field as dataclass_field
from typing import Any

from ..devices.rate_limiter import MAX_REFILL_MS, MAX_TOKENS, RateLimit
from ..errors import ConfigError

__all__ = ["Field", "RESOURCES", "VmSpec", "check_body", "ConfigError"]


@dataclass(frozen=True)
class Field:
    name: str
    type: str                       # string | integer | boolean | object | array
    required: bool = False
    enum: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    default: Any = None
    description: str = ""
    supported: tuple[Any, ...] | None = None  # values pyvmm honours (None: all valid ones)
    items: str | None = None        # for arrays: the item type
    ref: str | None = None          # for objects: the RESOURCES entry describing its fields


def _f(name: str, type_: str, description: str = "", **kw: Any) -> Field:
    return Field(name, type_, description=description, **kw)


_NOT_SUPPORTED = "is not supported by pyvmm"
_RATE_LIMITER = "an I/O rate limiter (pyvmm has none for this device: only null is accepted)"
_LIMIT = "Firecracker's RateLimiter: token buckets for bytes (bandwidth) and operations (ops); null: no limit"

MACHINE_CONFIG = (
    _f("vcpu_count", "integer", "number of vCPUs", required=True, minimum=1, maximum=255),
    _f("mem_size_mib", "integer", "guest RAM in MiB", required=True, minimum=1, maximum=1 << 20),
    _f("smt", "boolean", "simultaneous multithreading (pyvmm: false only)", default=False, supported=(False,)),
    _f("track_dirty_pages", "boolean", "log the guest pages written from InstanceStart on (Diff snapshots need it)", default=False),
    _f("cpu_template", "string", "CPU template (pyvmm: None only; hide features with pyvmm.cpu_hide)",
       enum=("C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"), default="None", supported=("None",)),
    _f("huge_pages", "string", "huge pages backing guest RAM: 2M from the host's hugetlb pool, Transparent "
       "(pyvmm) transparent huge pages; refused when the host has none", enum=("None", "Transparent", "2M"),
       default="None"),
    _f("ksm", "boolean", "pyvmm: guest RAM mergeable by KSM (same pages of this and other VMs shared while the "
       "host's KSM runs)", default=False),
)
BOOT_SOURCE = (
    _f("kernel_image_path", "string", "host path of the kernel (bzImage, vmlinux, ELF, Multiboot)", required=True),
    _f("boot_args", "string", "kernel command line"),
    _f("initrd_path", "string", "host path of the initial ramdisk"),
)
DRIVE = (
    _f("drive_id", "string", "the drive's id (the same as in the path)", required=True),
    _f("is_root_device", "boolean", "boot from this drive (root=/dev/vda unless boot_args say root=)",
       required=True),
    _f("path_on_host", "string", "host path of the raw image (or give socket)"),
    _f("is_read_only", "boolean", "read-only to the guest", default=False),
    _f("partuuid", "string", "the root partition's PARTUUID (with is_root_device)"),
    _f("cache_type", "string", "caching strategy", enum=("Unsafe", "Writeback"), default="Unsafe"),
    _f("io_engine", "string", "I/O engine (pyvmm: Sync only)", enum=("Sync", "Async"), default="Sync",
       supported=("Sync",)),
    _f("rate_limiter", "object", _LIMIT + " (ops: requests)", ref="RateLimiter"),
    _f("socket", "string", "a vhost-user-blk back-end's socket (instead of path_on_host)"),
)
PARTIAL_DRIVE = (
    _f("drive_id", "string", "the drive's id", required=True),
    _f("path_on_host", "string", "a new host path for the drive (pyvmm: pre-boot only)"),
    _f("rate_limiter", "object", _LIMIT + " (ops: requests); on a running VM it applies at once, buckets full",
       ref="RateLimiter"),
)
TOKEN_BUCKET = (
    _f("size", "integer", "tokens the bucket holds (bytes or operations); 0: no limit", required=True, minimum=0,
       maximum=MAX_TOKENS),
    _f("one_time_burst", "integer", "tokens given once on top of size, spent first, never refilled", minimum=0,
       maximum=MAX_TOKENS, default=0),
    _f("refill_time", "integer", "milliseconds the empty bucket takes to refill to size; 0: no limit",
       required=True, minimum=0, maximum=MAX_REFILL_MS),
)
RATE_LIMITER = (
    _f("bandwidth", "object", "token bucket with bytes as tokens", ref="TokenBucket"),
    _f("ops", "object", "token bucket with operations (requests, packets) as tokens", ref="TokenBucket"),
)
NETWORK_INTERFACE = (
    _f("iface_id", "string", "the interface's id (the same as in the path)", required=True),
    _f("host_dev_name", "string", "TAP device on the host; pyvmm: 'auto' makes one in a new network namespace",
       required=True),
    _f("guest_mac", "string", "the guest's MAC address"),
    _f("mtu", "integer", "MTU advertised to the guest (pyvmm: not supported)", minimum=68, maximum=65535,
       supported=(None,)),
    _f("rx_rate_limiter", "object", _LIMIT + " (ops: packets) for what the guest receives", ref="RateLimiter"),
    _f("tx_rate_limiter", "object", _LIMIT + " (ops: packets) for what the guest sends", ref="RateLimiter"),
)
PARTIAL_NETWORK_INTERFACE = (
    _f("iface_id", "string", "the interface's id", required=True),
    _f("rx_rate_limiter", "object", _LIMIT + " (ops: packets) for what the guest receives", ref="RateLimiter"),
    _f("tx_rate_limiter", "object", _LIMIT + " (ops: packets) for what the guest sends", ref="RateLimiter"),
)
VSOCK = (
    _f("guest_cid", "integer", "the guest's vsock CID", required=True, minimum=3, maximum=0xFFFFFFFE),
    _f("uds_path", "string", "host Unix socket; guest-initiated connections go to uds_path_PORT", required=True),
    _f("vsock_id", "string", "deprecated by Firecracker; ignored"),
)
ENTROPY = (_f("rate_limiter", "object", _RATE_LIMITER, supported=(None,)),)
LOGGER = (
    _f("log_path", "string", "file or named pipe for pyvmm's log"),
    _f("level", "string", "log level (case-insensitive)",
       enum=("Error", "Warning", "Info", "Debug", "Trace", "Off"), default="Info"),
    _f("show_level", "boolean", "put the level in each line", default=False),
    _f("show_log_origin", "boolean", "put the origin in each line", default=False),
    _f("module", "string", "only log from this module"),
)
METRICS = (_f("metrics_path", "string", "file or named pipe for JSON metrics", required=True),)
ACTION = (_f("action_type", "string", "the action", required=True,
             enum=("FlushMetrics", "InstanceStart", "SendCtrlAltDel")),)
VM_STATE = (_f("state", "string", "the state to go to", required=True, enum=("Paused", "Resumed")),)
PYVMM_ACTION = (_f("action_type", "string", "Stop: end the VM at once (destroy); Reboot: stop it and boot it "
                   "again; Shutdown: press the ACPI power button", required=True,
                   enum=("Stop", "Reboot", "Shutdown")),)
MIGRATION = (
    _f("destination", "string", "where the destination waits: unix:PATH or tcp:HOST:PORT", required=True),
    _f("downtime_ms", "integer", "the longest pause the last round may take, estimated (QEMU's default)",
       minimum=1, default=300),
    _f("bandwidth", "integer", "bytes per second the migration stream may use (default: no limit)", minimum=4096),
    _f("timeout", "integer", "seconds the whole migration may take before it gives up (default: no limit)",
       minimum=1),
    _f("max_rounds", "integer", "dirty-page rounds after the first pass before it gives up", minimum=1, default=30),
)
SNAPSHOT_CREATE = (
    _f("snapshot_path", "string", "host path of the state file to write", required=True),
    _f("mem_file_path", "string", "host path of the memory file to write (sparse: zero pages are holes)",
       required=True),
    _f("snapshot_type", "string", "Full: all of RAM; Diff: the pages written since the previous snapshot "
       "(needs machine-config track_dirty_pages); merge a Diff onto its base with pyvmm.snapshot.merge_diff",
       enum=("Full", "Diff"), default="Full"),
)
BALLOON = (
    _f("amount_mib", "integer", "target balloon size in MiB (memory taken from the guest)", required=True,
       minimum=0, maximum=1 << 20),
    _f("deflate_on_oom", "boolean", "let the guest deflate the balloon when it runs out of memory", required=True),
    _f("stats_polling_interval_s", "integer", "seconds between guest statistics updates (0: none)", minimum=0,
       maximum=0xFFFF, default=0),
    _f("free_page_hinting", "boolean", "free page hinting (pyvmm: false only; use free_page_reporting)",
       default=False, supported=(False,)),
    _f("free_page_reporting", "boolean", "the guest reports pages it frees, which go back to the host",
       default=False),
)
BALLOON_UPDATE = (_f("amount_mib", "integer", "target balloon size in MiB", required=True, minimum=0,
                     maximum=1 << 20),)
BALLOON_STATS_UPDATE = (_f("stats_polling_interval_s", "integer", "seconds between guest statistics updates (0: "
                           "none)", required=True, minimum=0, maximum=0xFFFF),)
MEMORY_BACKEND = (
    _f("backend_type", "string", "File: backend_path is the memory file; Uffd: backend_path is the socket of a "
       "page-fault handler, which is sent the userfaultfd and the RAM mappings", required=True,
       enum=("File", "Uffd")),
    _f("backend_path", "string", "the memory file, or the handler's Unix socket", required=True),
)
NETWORK_OVERRIDE = (
    _f("iface_id", "string", "an interface of the snapshot's VM", required=True),
    _f("host_dev_name", "string", "the TAP it uses from now on", required=True),
)
VSOCK_OVERRIDE = (_f("uds_path", "string", "the vsock device's host socket from now on", required=True),)
CLONE = (
    _f("name", "string", "the clone's name: its disk copies are DIRECTORY/NAME-diskN.EXT, its vsock socket "
       "DIRECTORY/NAME.vsock", required=True),
    _f("directory", "string", "where the clone's disk copies and vsock socket go", required=True),
)
SNAPSHOT_LOAD = (
    _f("snapshot_path", "string", "host path of the state file", required=True),
    _f("mem_file_path", "string", "deprecated by Firecracker: use mem_backend (exactly one of the two)"),
    _f("mem_backend", "object", "where guest memory comes from (MemoryBackend)"),
    _f("enable_diff_snapshots", "boolean", "deprecated by Firecracker: use track_dirty_pages"),
    _f("track_dirty_pages", "boolean", "log written pages from the start, for Diff snapshots", default=False),
    _f("resume_vm", "boolean", "resume the VM once loaded (else it stays paused)", default=False),
    _f("network_overrides", "array", "NetworkOverride objects: interfaces moved to other TAPs", items="object"),
    _f("vsock_override", "object", "VsockOverride: the vsock device's new host socket"),
    _f("restore_mode", "string", "pyvmm: how a File backend is loaded. copy: into fresh shared memory (every "
       "device); cow: a private copy-on-write mapping of the file, read on first touch (instant; not with "
       "vhost-user drives); uffd: fresh shared memory filled on first touch by pyvmm's userfaultfd handler",
       enum=("copy", "cow", "uffd"), default="copy"),
    _f("clone", "object", "pyvmm: load as a clone of the snapshot (Clone): its own copies of writable disks, new "
       "MACs, its own vsock socket, a new VM generation ID and vsock CID (pyvmm.clones)"),
)
PYVMM_OPTIONS = (
    _f("accel", "string", "CPU backend", enum=("auto", "kvm", "tcg"), default="auto"),
    _f("console", "string", "the guest's console device", enum=("serial", "virtio"), default="serial"),
    _f("cpu_hide", "array", "CPUID features hidden from the guest", items="string"),
    _f("transport", "string", "how virtio devices attach: PCI, or virtio-mmio found through ACPI (for guests "
       "booted with pci=off, as Firecracker's are)", enum=("pci", "mmio"), default="pci"),
    _f("on_reboot", "string", "when the guest resets the machine", enum=("restart", "destroy"), default="restart"),
    _f("kernel_args", "string", "kernel command line added to the default guest's (with boot-source, "
       "use boot_args)"),
    _f("description", "string", "free text"),
    _f("seccomp", "string", "system-call filters in the VM's process once it is set up (kill: a call outside "
       "the allow-list kills the process with SIGSYS; log: the kernel logs it; default: $PYVMM_SECCOMP, else kill)",
       enum=("kill", "log", "off")),
    _f("virtio_mem_mib", "integer", "a virtio-mem region of this many MiB (a multiple of 128) the guest can be "
       "given memory from while it runs (PUT /pyvmm/memory/virtio-mem); 0 for none", minimum=0, maximum=1 << 20),
    _f("numa", "array", "guest NUMA nodes, in order: 'cpus=0-1,mem=128M[,distances=10:20]' each (ACPI SRAT and "
       "SLIT); their memory adds up to mem_size_mib and every vCPU is in one", items="string"),
    _f("jail", "object", "start the VM's process in a jail (namespaces, private root, cgroup limits, its own uid, "
       "Landlock): {} for the defaults, or uid, gid, netns, cpus, memory_mib, pids, nofile (pyvmm.jail.config)"),
    _f("max_vcpus", "integer", "CPU hotplug: vCPUs can be added to the running VM up to this many "
       "(PUT /pyvmm/vcpus; at least vcpu_count)", minimum=1, maximum=255),
    _f("test_devices", "boolean", "the devices QEMU's test kernels use: fw_cfg (ports 0x510-0x511) and "
       "pc-testdev (0xe0 port latch, ISA IRQ lines at 0x2000)", default=False),
)
PYVMM_VCPUS = (
    _f("count", "integer", "the vCPUs the VM is to have: added, or removed once the guest has ejected them",
       required=True, minimum=1, maximum=255),
    _f("timeout", "integer", "seconds to wait for the guest to eject each vCPU removed (default 60)",
       minimum=1, maximum=3600, default=60),
)

_CONNECT = _f("connect_timeout", "integer", "seconds to wait for the guest's agent to answer (default 10)",
              minimum=1, maximum=60)
AGENT_EXEC = (
    _f("argv", "array", "the command and its arguments", required=True, items="string"),
    _f("stdin", "string", "the command's standard input, base64 (default: none)"),
    _f("env", "object", "environment variables added for the command, NAME: value"),
    _f("cwd", "string", "its working directory (default /)"),
    _f("timeout", "integer", "seconds before the command is killed (the request then fails)", minimum=1,
       maximum=86400),
    _CONNECT,
)
AGENT_FILE = (
    _f("path", "string", "the guest file to create or replace", required=True),
    _f("content", "string", "its contents, base64", required=True),
    _f("mode", "integer", "its permission bits", minimum=0, maximum=0o7777, default=0o644),
    _CONNECT,
)

# name -> fields; the OpenAPI component schemas are made from this table.
RESOURCES: dict[str, tuple[Field, ...]] = {
    "MachineConfiguration": MACHINE_CONFIG, "BootSource": BOOT_SOURCE, "Drive": DRIVE,
    "PartialDrive": PARTIAL_DRIVE, "NetworkInterface": NETWORK_INTERFACE,
    "PartialNetworkInterface": PARTIAL_NETWORK_INTERFACE, "RateLimiter": RATE_LIMITER, "TokenBucket": TOKEN_BUCKET,
    "Vsock": VSOCK,
    "EntropyDevice": ENTROPY, "Logger": LOGGER, "Metrics": METRICS, "InstanceActionInfo": ACTION,
    "Vm": VM_STATE, "PyvmmAction": PYVMM_ACTION, "PyvmmOptions": PYVMM_OPTIONS, "PyvmmMigration": MIGRATION,
    "AgentExec": AGENT_EXEC, "AgentFile": AGENT_FILE, "PyvmmVcpus": PYVMM_VCPUS,
    "SnapshotCreateParams": SNAPSHOT_CREATE, "SnapshotLoadParams": SNAPSHOT_LOAD, "MemoryBackend": MEMORY_BACKEND,
    "NetworkOverride": NETWORK_OVERRIDE, "VsockOverride": VSOCK_OVERRIDE, "Clone": CLONE,
    "Balloon": BALLOON, "BalloonUpdate": BALLOON_UPDATE, "BalloonStatsUpdate": BALLOON_STATS_UPDATE,
}

_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "boolean": (bool,), "object": (dict,), "array": (list,)}
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def _name(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


def check_value(spec: Field, value: Any, where: str) -> Any:
    """One field's value, checked against its spec; returns it."""
    if value is None and not spec.required and spec.type == "object":
        return None  # Firecracker's optional rate limiters may be sent as null
    types = _TYPES[spec.type]
    # JSON's true is not a number, and 1 is not a boolean
    if not isinstance(value, types) or (spec.type == "integer" and isinstance(value, bool)):
        raise ConfigError(f"must be {'an' if spec.type[0] in 'aeiou' else 'a'} {spec.type} (got {value!r:.60})", where)
    checked: Any = value  # of the spec's type from here on
    if spec.enum is not None and checked not in spec.enum:
        raise ConfigError(f"must be one of {', '.join(spec.enum)} (got {checked!r:.60})", where)
    if spec.minimum is not None and checked < spec.minimum:
        raise ConfigError(f"must be at least {spec.minimum} (got {checked})", where)
    if spec.maximum is not None and checked > spec.maximum:
        raise ConfigError(f"must be at most {spec.maximum} (got {checked})", where)
    if spec.type == "array" and spec.items is not None:
        for index, item in enumerate(checked):
            if not isinstance(item, _TYPES[spec.items]):
                raise ConfigError(f"must be a {spec.items} (got {item!r:.60})", f"{where}[{index}]")
    if spec.supported is not None and checked not in spec.supported:
        raise ConfigError(f"{checked!r:.60} {_NOT_SUPPORTED}", where)
    if spec.type == "string" and "\0" in checked:
        raise ConfigError("must not contain NUL characters", where)
    return checked


def check_body(body: Any, fields: tuple[Field, ...], prefix: str = "", *, partial: bool = False,
               what: str = "the body") -> dict[str, Any]:
    """`body` checked against `fields`: a JSON object, no unknown field, every required one
    present (unless `partial`), each value of its type and range. Returns a new dict."""
    if not isinstance(body, dict):
        raise ConfigError(f"{what} must be a JSON object (got {type(body).__name__})", prefix.rstrip(".") or None)
    specs = {spec.name: spec for spec in fields}
    for name in body:
        if name not in specs:
            raise ConfigError(f"is not a known field (known: {', '.join(specs)})", _name(prefix, str(name)))
    checked: dict[str, Any] = {}
    for spec in fields:
        if spec.name in body:
            checked[spec.name] = check_value(spec, body[spec.name], _name(prefix, spec.name))
        elif spec.required and not partial:
            raise ConfigError("is required", _name(prefix, spec.name))
    return checked


def check_id(value: str, where: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(f"{value!r:.60}: ids are 1-64 letters, digits, '_', '.', '-'", where)
    return value


def machine_defaults() -> dict[str, Any]:
    """Firecracker's defaults: 1 vCPU, 128 MiB, no SMT, no template, no huge pages."""
    return {"vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False,
            "cpu_template": "None", "huge_pages": "None"}


def check_drive(body: Any, drive_id: str, prefix: str = "") -> dict[str, Any]:
    drive = check_body(body, DRIVE, prefix)
    if drive["drive_id"] != drive_id:
        raise ConfigError(f"{drive['drive_id']!r} differs from the id in the path ({drive_id!r})", f"{prefix}drive_id")
    check_id(drive_id, f"{prefix}drive_id")
    if ("path_on_host" in drive) == ("socket" in drive):
        raise ConfigError("give path_on_host (a raw image) or socket (vhost-user), exactly one", f"{prefix}path_on_host")
    if "socket" in drive and drive.get("is_read_only"):
        raise ConfigError("is not for a vhost-user drive (socket)", f"{prefix}is_read_only")
    if "partuuid" in drive and not drive["is_root_device"]:
        raise ConfigError("is only for the root device (is_root_device: true)", f"{prefix}partuuid")
    if rate_limit(drive, "rate_limiter", prefix) is not None and "socket" in drive:
        raise ConfigError("is not for a vhost-user drive (socket): its back-end does the I/O", f"{prefix}rate_limiter")
    return drive


def rate_limit(body: dict[str, Any], name: str, prefix: str = "") -> RateLimit | None:
    """A body's rate limiter field, checked (ConfigError names the bucket field); None: no limit."""
    return RateLimit.from_api(body.get(name), f"{prefix}{name}")


_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


def drive_disk(drive: dict[str, Any], transport: str):
    """The config.DiskConfig of a checked drive: its device-tree id is the drive id."""
    from ..config import DiskConfig

    drive_id = drive["drive_id"]
    return DiskConfig(path=drive.get("path_on_host"), readonly=drive.get("is_read_only", False),
                      serial=drive_id if len(drive_id.encode()) <= 20 else None, vhost_user=drive.get("socket"),
                      transport=transport, rate_limit=rate_limit(drive, "rate_limiter"), id=drive_id)


def interface_net(interface: dict[str, Any], transport: str):
    """The config.NetConfig of a checked network interface: its device-tree id is the iface id."""
    from ..config import NetConfig

    return NetConfig(tap=interface["host_dev_name"], mac=interface.get("guest_mac"), transport=transport,
                     rx_rate_limit=rate_limit(interface, "rx_rate_limiter"),
                     tx_rate_limit=rate_limit(interface, "tx_rate_limiter"), id=interface["iface_id"])


def check_interface(body: Any, iface_id: str, prefix: str = "") -> dict[str, Any]:
    net = check_body(body, NETWORK_INTERFACE, prefix)
    if net["iface_id"] != iface_id:
        raise ConfigError(f"{net['iface_id']!r} differs from the id in the path ({iface_id!r})", f"{prefix}iface_id")
    check_id(iface_id, f"{prefix}iface_id")
    mac = net.get("guest_mac")
    if mac is not None and (not _MAC.match(mac) or int(mac[:2], 16) & 1):
        raise ConfigError(f"{mac!r:.60} is not a unicast MAC address like 52:54:00:12:34:56", f"{prefix}guest_mac")
    if not net["host_dev_name"] or len(net["host_dev_name"]) > 15:
        raise ConfigError("must be a TAP device name of 1-15 characters (or auto)", f"{prefix}host_dev_name")
    for name in ("rx_rate_limiter", "tx_rate_limiter"):
        rate_limit(net, name, prefix)
    return net


def check_logger(body: Any, prefix: str = "") -> dict[str, Any]:
    logger = dict(body) if isinstance(body, dict) else body
    if isinstance(logger, dict) and isinstance(logger.get("level"), str):  # case-insensitive, like Firecracker
        logger["level"] = logger["level"].capitalize()
    return check_body(logger, LOGGER, prefix)


_HUGE_PAGES = {"None": "none", "2M": "2M", "Transparent": "transparent"}


@dataclass
class VmSpec:
    """A whole VM as Firecracker's full configuration describes it, plus pyvmm's options.

    The API builds one request by request; a definition file or a Firecracker --config-file
    gives it at once (from_document). to_document() is GET /vm/config's answer."""
    machine: dict[str, Any] = dataclass_field(default_factory=machine_defaults)
    boot_source: dict[str, Any] | None = None     # None: pyvmm's default guest
    drives: dict[str, dict[str, Any]] = dataclass_field(default_factory=dict)
    interfaces: dict[str, dict[str, Any]] = dataclass_field(default_factory=dict)
    vsock: dict[str, Any] | None = None
    entropy: dict[str, Any] | None = None
    logger: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    pyvmm: dict[str, Any] = dataclass_field(default_factory=dict)
    balloon: dict[str, Any] | None = None

    def copy(self) -> "VmSpec":
        return copy.deepcopy(self)

    def put_drive(self, drive: dict[str, Any], where: str = "is_root_device") -> None:
        roots = [d for d in self.drives.values() if d["is_root_device"] and d["drive_id"] != drive["drive_id"]]
        if drive["is_root_device"] and roots:
            raise ConfigError(f"drive {roots[0]['drive_id']!r} is the root device already", where)
        self.drives[drive["drive_id"]] = drive

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {"machine-config": dict(self.machine)}
        if self.boot_source is not None:
            document["boot-source"] = dict(self.boot_source)
        document["drives"] = [dict(d) for d in self.drives.values()]
        document["network-interfaces"] = [dict(n) for n in self.interfaces.values()]
        for key, value in (("vsock", self.vsock), ("entropy", self.entropy), ("logger", self.logger),
                           ("metrics", self.metrics), ("balloon", self.balloon)):
            if value is not None:
                document[key] = dict(value)
        if self.pyvmm:
            document["pyvmm"] = copy.deepcopy(self.pyvmm)
        return document

    @classmethod
    def from_document(cls, document: Any, *, extra: tuple[str, ...] = ()) -> "VmSpec":
        """A full configuration (Firecracker's --config-file layout, or a definition file);
        field errors name the path ("drives[1].path_on_host"). `extra`: top-level keys the
        caller handles itself (a definition's "name")."""
        if not isinstance(document, dict):
            raise ConfigError(f"a VM description must be an object/table (got {type(document).__name__})")
        known = ("machine-config", "boot-source", "drives", "network-interfaces", "vsock", "entropy", "logger",
                 "metrics", "pyvmm", "balloon", *extra)
        for key in document:
            if key not in known:
                raise ConfigError(f"is not a known section (known: {', '.join(known)})", str(key))
        spec = cls()
        if "machine-config" in document:
            spec.machine = {**machine_defaults(), **check_body(document["machine-config"], MACHINE_CONFIG,
                                                               "machine-config.", what="machine-config")}
        if "boot-source" in document:
            spec.boot_source = check_body(document["boot-source"], BOOT_SOURCE, "boot-source.", what="boot-source")
        for key, checker, target in (("drives", check_drive, spec.drives),
                                     ("network-interfaces", check_interface, spec.interfaces)):
            items = document.get(key, [])
            if not isinstance(items, list):
                raise ConfigError(f"must be a list (got {type(items).__name__})", key)
            id_key = "drive_id" if key == "drives" else "iface_id"
            for index, item in enumerate(items):
                prefix = f"{key}[{index}]."
                item_id = item.get(id_key) if isinstance(item, dict) else None
                checked = checker(item, item_id if isinstance(item_id, str) else "", prefix)
                if checked[id_key] in target:
                    raise ConfigError(f"{checked[id_key]!r} is given twice", f"{prefix}{id_key}")
                if key == "drives":
                    spec.put_drive(checked, f"{prefix}is_root_device")
                else:
                    target[checked[id_key]] = checked
        for key, fields in (("vsock", VSOCK), ("entropy", ENTROPY), ("metrics", METRICS), ("balloon", BALLOON)):
            if key in document:
                setattr(spec, key, check_body(document[key], fields, f"{key}.", what=key))
        if "logger" in document:
            spec.logger = check_logger(document["logger"], "logger.")
        if "pyvmm" in document:
            spec.pyvmm = check_body(document["pyvmm"], PYVMM_OPTIONS, "pyvmm.", what="pyvmm")
            if "jail" in spec.pyvmm:
                from ..jail import JailConfig

                JailConfig.from_options(spec.pyvmm["jail"])
        spec.machine_config()  # what MachineConfig itself checks (CPU feature names...) fails here
        return spec

    def drives_in_order(self) -> list[dict[str, Any]]:
        """The drives in the order the VM has them (virtio-blk0 first): the root drive is vda."""
        return sorted(self.drives.values(), key=lambda d: not d["is_root_device"])

    def machine_config(self):
        """The MachineConfig and RunOptions this spec describes (the default guest's kernel is
        filled in later, by runner.with_default_guest). MachineConfig's own errors are
        renamed to this document's fields."""
        from ..config import BalloonConfig, MachineConfig, RunOptions, VsockConfig, parse_numa_node

        boot = self.boot_source or {}
        cmdline = boot.get("boot_args", "") if self.boot_source is not None else self.pyvmm.get("kernel_args", "")
        drives = self.drives_in_order()
        root = drives[0] if drives and drives[0]["is_root_device"] else None
        if root is not None and not re.search(r"(^|\s)root=", cmdline):
            device = f"PARTUUID={root['partuuid']}" if root.get("partuuid") else "/dev/vda"
            cmdline = f"{cmdline} root={device} {'ro' if root.get('is_read_only') else 'rw'}".strip()
        vsock = self.vsock
        transport = self.pyvmm.get("transport", "pci")
        machine = MachineConfig(
            kernel=boot.get("kernel_image_path"), initrd=boot.get("initrd_path"), cmdline=cmdline,
            memory=self.machine["mem_size_mib"] << 20, cpus=self.machine["vcpu_count"],
            cpu_hide=frozenset(self.pyvmm.get("cpu_hide", ())),
            disks=tuple(drive_disk(d, transport) for d in drives),
            nets=tuple(interface_net(n, transport) for n in self.interfaces.values()),
            vsock=VsockConfig(vsock["guest_cid"], vsock["uds_path"], transport) if vsock is not None else None,
            rng=transport if self.entropy is not None else None,
            console=self.pyvmm.get("console", "serial"), console_transport=transport,
            balloon=None if self.balloon is None else BalloonConfig(
                self.balloon["amount_mib"], self.balloon["deflate_on_oom"],
                self.balloon.get("stats_polling_interval_s", 0), self.balloon.get("free_page_reporting", False),
                transport),
            huge_pages=_HUGE_PAGES[self.machine.get("huge_pages", "None")], ksm=self.machine.get("ksm", False),
            max_cpus=self.pyvmm.get("max_vcpus"), test_devices=self.pyvmm.get("test_devices", False))
        options = RunOptions(accel=self.pyvmm.get("accel", "auto"))
        try:
            nodes = tuple(parse_numa_node(text, f"numa[{index}]") for index, text in enumerate(self.pyvmm.get("numa", ())))
            machine = dataclasses.replace(machine, numa=nodes, virtio_mem_size=self.pyvmm.get("virtio_mem_mib", 0) << 20,
                                          virtio_mem_transport=transport)
            machine.validate()
            options.validate()
        except ConfigError as exc:
            raise ConfigError(exc.detail, self.field_name(exc.field, drives)) from None
        return machine, options

    def field_name(self, field: str | None, drives: list[dict[str, Any]]) -> str | None:
        """A MachineConfig field ('memory', 'disks[0].serial') as this document names it."""
        if field is None:
            return None
        top, _, rest = field.partition(".")
        simple = {"memory": "machine-config.mem_size_mib", "cpus": "machine-config.vcpu_count",
                  "kernel": "boot-source.kernel_image_path", "initrd": "boot-source.initrd_path",
                  "cmdline": "boot-source.boot_args" if self.boot_source is not None else "pyvmm.kernel_args",
                  "cpu_hide": "pyvmm.cpu_hide", "console": "pyvmm.console",
                  "accel": "pyvmm.accel", "rng": "entropy", "huge_pages": "machine-config.huge_pages",
                  "ksm": "machine-config.ksm", "numa": "pyvmm.numa",
                  "virtio_mem_size": "pyvmm.virtio_mem_mib", "max_cpus": "pyvmm.max_vcpus",
                  "test_devices": "pyvmm.test_devices"}
        if top in simple:
            return simple[top]
        if top.startswith("numa"):
            return f"pyvmm.{field}"
        match = re.match(r"(disks|nets)\[(\d+)\]", top)
        if match and match.group(1) == "disks":
            drive = drives[int(match.group(2))]
            name = {"path": "path_on_host", "readonly": "is_read_only", "vhost_user": "socket",
                    "serial": "drive_id"}.get(rest, rest or "path_on_host")
            return f"drives[{drive['drive_id']}].{name}"
        if match:
            iface = list(self.interfaces)[int(match.group(2))]
            return f"network-interfaces[{iface}].{ {'mac': 'guest_mac', 'tap': 'host_dev_name'}.get(rest, rest)}"
        if top == "balloon":
            return f"balloon.{ {'stats_interval_s': 'stats_polling_interval_s'}.get(rest, rest)}" if rest else "balloon"
        if top == "vsock":
            return f"vsock.{ {'cid': 'guest_cid', 'uds': 'uds_path'}.get(rest, rest)}" if rest else "vsock"
        return field
