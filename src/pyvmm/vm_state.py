"""VmState: a paused VM's whole state, apart from guest memory.

What a VM restored in this process needs to continue where the guest stood (restore.py):
the machine description it was built from (so devices and their host sides are made again
from it), the device tree (so every device gets the same ports, windows, GSIs and slots),
every device's state by device-tree id, every vCPU's state, the accelerator's VM-wide state
(KVM: in-kernel PICs, IOAPIC, PIT and kvm-clock; the software CPU: the SoftwarePlatform with
its clock) and the guest clock when saved. Guest memory is not in it: the restored VM maps
the same memory (a snapshot will write it to files).

A virtio device's state is its transport's (which holds the device's). The PCI root's entry
holds only its own CONF1 latch: the functions in its slots are saved under their own ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Every State kind a VmState may hold is registered by importing its module (persist reads
# a polymorphic field back by kind).
from .accel.kvm import state as _kvm_state  # noqa: F401
from .arch.x86_64.cpu_state import GuestCpuView, VcpuState
from .config import BalloonConfig, ConsolePort, DiskConfig, MachineConfig, NetConfig, NumaNode, VsockConfig
from .devices.rate_limiter import RateLimit
from .devices import legacy as _legacy  # noqa: F401
from .devices.legacy import cpu_hotplug as _cpu_hotplug, ged as _ged, pci_hotplug as _pci_hotplug  # noqa: F401 - built by the builder, which a reader of a state need not import
from .devices.virtio import balloon, blk, console, mem, mmio, net, pci, rng, vhost_user_blk, vsock  # noqa: F401
from .devmgr import DeviceTreeState
from .errors import ConfigError
from .persist import State
from .pci import root as _pci_root  # noqa: F401
from .platform import machine as _platform  # noqa: F401

ACCELERATORS = ("kvm", "tcg")


@dataclass(frozen=True)
class DiskDescription(State):
    """Version 2 added the rate limit set at start (the device's state holds the one in force);
    version 3 `id` (None: the default, virtio-blkN)."""
    KIND = "machine-disk"
    VERSION = 3
    path: str | None
    readonly: bool
    serial: str | None
    transport: str
    vhost_user: str | None
    rate_limit: RateLimit | None = None
    id: str | None = None

    @classmethod
    def upgrade(cls, version: int, fields: dict) -> dict:
        if version == 1:
            fields = {**fields, "rate_limit": None}
        if version <= 2:
            return {**fields, "id": None}
        return super().upgrade(version, fields)


@dataclass(frozen=True)
class NetDescription(State):
    """Version 2 added the rate limits set at start (the device's state holds those in force);
    version 3 `id` (None: the default, virtio-netN)."""
    KIND = "machine-net"
    VERSION = 3
    tap: str
    mac: str | None
    transport: str
    rx_rate_limit: RateLimit | None = None
    tx_rate_limit: RateLimit | None = None
    id: str | None = None

    @classmethod
    def upgrade(cls, version: int, fields: dict) -> dict:
        if version == 1:
            fields = {**fields, "rx_rate_limit": None, "tx_rate_limit": None}
        if version <= 2:
            return {**fields, "id": None}
        return super().upgrade(version, fields)


@dataclass(frozen=True)
class VsockDescription(State):
    KIND = "machine-vsock"
    cid: int
    uds: str
    transport: str


@dataclass(frozen=True)
class ConsolePortDescription(State):
    KIND = "machine-console-port"
    name: str
    socket: str


@dataclass(frozen=True)
class BalloonDescription(State):
    KIND = "machine-balloon"
    amount_mib: int
    deflate_on_oom: bool
    stats_interval_s: int
    free_page_reporting: bool
    transport: str


@dataclass(frozen=True)
class MachineDescription(State):
    """config.MachineConfig as a state: the machine, whatever the run. Version 2 added the
    balloon and how guest RAM is backed (huge_pages, ksm); version 3 the guest NUMA nodes; version 4
    the virtio-mem region; version 5 max_cpus (CPU hotplug); version 6 test_devices."""
    KIND = "machine"
    VERSION = 6
    kernel: str | None
    initrd: str | None
    boot: str
    cmdline: str
    memory: int
    cpus: int
    modules: tuple[str, ...]
    flat_address: int | None
    flat_64bit: bool
    cpu_hide: tuple[str, ...]
    disks: tuple[DiskDescription, ...]
    nets: tuple[NetDescription, ...]
    vsock: VsockDescription | None
    rng: str | None
    console: str
    console_transport: str
    console_ports: tuple[ConsolePortDescription, ...]
    balloon: BalloonDescription | None
    huge_pages: str
    ksm: bool
    numa: tuple[NumaNode, ...] = ()
    virtio_mem_size: int = 0
    virtio_mem_transport: str = "pci"
    max_cpus: int | None = None
    test_devices: bool = False

    @classmethod
    def upgrade(cls, version: int, fields: dict) -> dict:
        none = {"virtio_mem_size": 0, "virtio_mem_transport": "pci"}
        if version == 1:
            fields = {**fields, "balloon": None, "huge_pages": "none", "ksm": False, "numa": [], **none}
        if version == 2:
            fields = {**fields, "numa": [], **none}
        if version == 3:
            fields = {**fields, **none}
        if version <= 4:
            fields = {**fields, "max_cpus": None}
        if version <= 5:
            return {**fields, "test_devices": False}
        return super().upgrade(version, fields)

    def validate(self) -> None:
        try:
            self.to_config().validate()
        except ConfigError as exc:
            self.fail(exc.field or "config", exc.detail.lstrip(": "))

    @classmethod
    def from_config(cls, config: MachineConfig) -> "MachineDescription":
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        fields["cpu_hide"] = tuple(sorted(config.cpu_hide))
        fields["disks"] = tuple(DiskDescription(**_plain(d)) for d in config.disks)
        fields["nets"] = tuple(NetDescription(**_plain(n)) for n in config.nets)
        fields["vsock"] = None if config.vsock is None else VsockDescription(**dataclasses.asdict(config.vsock))
        fields["console_ports"] = tuple(ConsolePortDescription(**dataclasses.asdict(p)) for p in config.console_ports)
        fields["balloon"] = None if config.balloon is None else BalloonDescription(**dataclasses.asdict(config.balloon))
        return cls(**fields)

    def to_config(self) -> MachineConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["cpu_hide"] = frozenset(self.cpu_hide)
        fields["disks"] = tuple(DiskConfig(**_plain(d)) for d in self.disks)
        fields["nets"] = tuple(NetConfig(**_plain(n)) for n in self.nets)
        fields["vsock"] = None if self.vsock is None else VsockConfig(**_plain(self.vsock))
        fields["console_ports"] = tuple(ConsolePort(**_plain(p)) for p in self.console_ports)
        fields["balloon"] = None if self.balloon is None else BalloonConfig(**_plain(self.balloon))
        return MachineConfig(**fields)


def _plain(value) -> dict:
    """A dataclass's fields, one level deep (nested states such as a RateLimit stay as they are)."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


@dataclass(frozen=True)
class VmState(State):
    """Version 2 added `guest_view` (None in a version-1 state: a restore on another
    accelerator is then refused, since what the guest saw of its CPU is unknown)."""
    KIND = "vm"
    VERSION = 2
    machine: MachineDescription
    accelerator: str                    # kvm | tcg: the backend whose state `platform` is
    device_tree: DeviceTreeState
    devices: dict[str, State]           # by device-tree id
    vcpus: tuple[VcpuState, ...]
    platform: State                     # KvmVmState | SoftwarePlatformState
    guest_clock_ns: int
    guest_view: GuestCpuView | None

    @classmethod
    def upgrade(cls, version: int, fields: dict) -> dict:
        if version == 1:
            return {**fields, "guest_view": None}
        return super().upgrade(version, fields)

    def validate(self) -> None:
        if self.accelerator not in ACCELERATORS:
            self.fail("accelerator", f"{self.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
        platform: type[State] = {"kvm": _kvm_state.KvmVmState,
                                 "tcg": _platform.SoftwarePlatformState}[self.accelerator]
        if not isinstance(self.platform, platform):
            self.fail("platform", f"a {self.platform.KIND!r} state, a {self.accelerator} VM saves a {platform.KIND!r} state")
        if len(self.vcpus) != self.machine.cpus:
            self.fail("vcpus", f"{len(self.vcpus)} saved, the machine has {self.machine.cpus}")
        ids = [node.id for node in self.device_tree.nodes]
        if sorted(self.devices) != sorted(ids):
            missing = sorted(set(ids) - set(self.devices)) or sorted(set(self.devices) - set(ids))
            self.fail("devices", f"{missing[0]!r} is {'not saved' if missing[0] in ids else 'not in the device tree'}")
        self.check_range("guest_clock_ns", 0, (1 << 64) - 1)


def capture(vm) -> VmState:
    """`vm`'s VmState (vm.save() checked that it is paused)."""
    manager = vm.device_manager
    return VmState(machine=MachineDescription.from_config(vm.machine), accelerator=vm.accel.name,
                   device_tree=manager.tree.save(), devices=save_devices(manager),
                   vcpus=tuple(vcpu.save() for vcpu in vm.vcpus), platform=vm.accel.save(),
                   guest_clock_ns=vm.accel.guest_clock_ns(), guest_view=vm.accel.guest_view())


def save_devices(manager) -> dict[str, State]:
    """Every device's state by id: a virtio device's is its transport's; the PCI root's holds
    its CONF1 latch and its own functions (the host bridge), the devices in its other slots
    are saved under their own ids."""
    states: dict[str, State] = {}
    for node in manager.tree:
        if node.id in states:
            continue
        target = manager.transport(node.id) or manager.device(node.id)
        state = target.save()
        if node.kind == "pci-root":
            children = {child.resources.pci_slot: child.id for child in manager.tree.children(node.id)}
            for slot, child in children.items():
                states[child] = state.devices[slot]
            state = dataclasses.replace(state, devices={slot: function for slot, function in state.devices.items()
                                                        if slot not in children})
        states[node.id] = state
    return {node.id: states[node.id] for node in manager.tree}
