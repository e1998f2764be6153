"""A VmState + guest memory -> a paused Vm that continues where the saved one stood.

build_vm's sibling: the same assembly (builder.assemble) from the machine description in
the state, with the device manager replaying the recorded device tree, so every device gets
the ports, windows, GSIs and slots it had; then, instead of ACPI tables, a kernel and a
boot state (memory holds them already), the accelerator's VM-wide state, every device's and
every vCPU's state are loaded. The Vm returned is started and paused: resume() continues.

Guest memory is passed in. Within one process the new VM maps the memory of the VM it
replaces (its release_memory()); a snapshot will pass memory read back from files. Host-side
resources (disk images, TAPs, console sockets, the vsock listener) are opened again from the
machine description, except what a `Carryover` hands over from the replaced VM: the vsock
host side with its live connections, so host programs keep their sockets.

Replacing a VM in this process goes: pause, save, carry_over (after save: it detaches the
host sides), close the old VM (its memory stays open), restore_vm with the carryover.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

from .accel.cross import across_accelerators
from .arch.x86_64 import layout
from .arch.x86_64.cpuid import CpuidPolicy
from .builder import CPU_HOTPLUG_ID, PCI_HOTPLUG_ID, PCI_ROOT_ID, TEST_DEVICE_IDS, assemble, create_vcpus
from .config import MachineConfig
from .devices.virtio.device import VirtioDevice
from .devmgr import DeviceTree, DeviceTreeState
from .host.vsock import VsockCarryover
from .memory import GuestMemory
from .persist import State, StateError, require
from .vm import Vm, VmNotPaused
from .vm_state import VmState, _pci_root

log = logging.getLogger(__name__)

VSOCK_ID = "virtio-vsock"
# The devices every machine has (builder.assemble), by device-tree id.
FIXED_DEVICE_IDS = ("com1", "i8042", "debug-exit", "post", "acpi-power", "guest-notify", "pvpanic", "ged",
                    PCI_HOTPLUG_ID, "rtc", PCI_ROOT_ID)
# Devices a state saved before they existed may lack: they start fresh.
NEWER_DEVICE_IDS = (PCI_HOTPLUG_ID,)


@dataclass
class Carryover:
    """What a VM replaced in this process hands to the VM restored from its state: its guest
    memory and the host sides that hold live connections (by device-tree id)."""
    memory: GuestMemory | None          # None once a restored VM owns it
    vsock: dict[str, VsockCarryover] = field(default_factory=dict)

    def close(self) -> None:
        """Not used for a restore after all: release what it holds."""
        for carried in self.vsock.values():
            carried.close()
        self.vsock.clear()
        if self.memory is not None:
            self.memory.close()
            self.memory = None


def carry_over(vm: Vm) -> Carryover:
    """Take guest memory and the vsock host sides from paused `vm` (after vm.save()): closing
    `vm` afterwards releases everything else and leaves these to the Carryover."""
    if not vm.paused or vm.stopped:
        raise VmNotPaused("the VM must be paused (and saved) before its memory is carried over")
    manager = vm.device_manager
    assert manager is not None, "a Vm from the builder has its device manager"
    carried = Carryover(vm.release_memory())
    for node in manager.tree:
        device: Any = manager.device(node.id)
        if node.kind == "virtio-vsock":
            host = device.detach_host()
            if hasattr(host, "carry_over"):
                carried.vsock[node.id] = host.carry_over()
    return carried


def expected_device_ids(config: MachineConfig) -> list[str]:
    """The device-tree ids a machine built from `config` has (builder.assemble's names)."""
    ids = list(FIXED_DEVICE_IDS)
    if config.max_cpus is not None:
        ids.append(CPU_HOTPLUG_ID)
    if config.test_devices:
        ids += TEST_DEVICE_IDS
    if config.console == "virtio" or config.console_ports:
        ids.append("virtio-console")
    ids += [config.disk_id(i) for i in range(len(config.disks))]
    ids += [config.net_id(i) for i in range(len(config.nets))]
    if config.vsock is not None:
        ids.append(VSOCK_ID)
    if config.rng is not None:
        ids.append("virtio-rng")
    if config.balloon is not None:
        ids.append("virtio-balloon")
    if config.virtio_mem_size:
        ids.append("virtio-mem")
    return ids


def check_state(state: VmState, memory: GuestMemory, accel=None, config: MachineConfig | None = None) -> MachineConfig:
    """Everything about `state` that can be checked before anything is created; the machine
    description to build. One StateError line otherwise."""
    state = require(state, VmState)
    machine = state.machine.to_config()
    if config is not None and config != machine:
        name = next(f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(machine, f.name))
        raise StateError(f"vm state: machine.{name}: the state's machine differs from this one's")
    regions = [(int(r.guest_base), r.size) for r in memory.regions]
    wanted = [(spec.guest_base, spec.size) for spec in layout.memory_specs(machine.memory, machine.virtio_mem_size)]
    if regions != wanted:
        raise StateError(f"vm state: machine.memory: {machine.memory >> 20} MiB of guest RAM, "
                         f"the memory given holds {memory.size >> 20} MiB")
    saved = [node.id for node in state.device_tree.nodes]
    expected = [i for i in expected_device_ids(machine) if i in saved or i not in NEWER_DEVICE_IDS]
    if sorted(saved) != sorted(expected):
        odd = sorted(set(saved) ^ set(expected))[0]
        raise StateError(f"vm state: device_tree: {odd!r} is "
                         f"{'not a device of this machine' if odd in saved else 'missing'}")
    return machine


def restore_vm(state: VmState, memory: GuestMemory, console_write: Callable[[bytes], None], *, accel=None,
               config: MachineConfig | None = None, carryover: Carryover | None = None) -> Vm:
    """A started, paused Vm continuing `state` in `memory` (which it owns from then on).
    `accel`: an accelerator instance (default: a new one of the kind the state was saved
    on); of the other kind, the state is converted (accel/cross.py) or refused in one line;
    `config`: the machine the caller expects (refused unless it is the state's). On an error
    nothing is left built and `memory` stays the caller's."""
    machine = check_state(state, memory, accel, config)
    memory.ram_size = machine.memory  # not the virtio-mem region
    memory.advise(machine.backing())  # KSM / THP where the restored RAM is private memory
    if accel is not None and accel.name != state.accelerator:
        state = _converted(state, accel, machine)
    vsock_carried: VsockCarryover | None = carryover.vsock.pop(VSOCK_ID, None) if carryover is not None else None
    if vsock_carried is not None and machine.vsock is None:
        vsock_carried.close()
        vsock_carried = None
    if accel is None:
        from .accel.select import choose_accelerator

        accel = choose_accelerator(state.accelerator).create()
    vm = prepare_vm(machine, state.device_tree, memory, console_write, accel, vsock_carried=vsock_carried)
    try:
        finish_restore(vm, state)
    except BaseException:
        vm.release_memory()
        vm.close()
        raise
    if carryover is not None:
        carryover.memory = None  # the Vm owns it now
    return vm


def prepare_vm(machine: MachineConfig, device_tree: DeviceTreeState, memory: GuestMemory,
               console_write: Callable[[bytes], None], accel, *, vsock_carried: VsockCarryover | None = None,
               lock_disks: bool = True) -> Vm:
    """The first half of a restore, which needs no state but the machine and its device tree:
    the VM assembled on `memory` (devices where the tree put them, host sides open, vCPUs
    made), paused and not started. A live migration's destination builds it before the last
    round, so what the pause costs is only finish_restore(). `lock_disks=False` opens the disk
    images without their locks (the source still holds them): finish_restore takes them.
    On an error nothing is left built (`accel` closed) and `memory` stays the caller's."""
    with ExitStack() as cleanup:
        parts = assemble(cleanup, machine, console_write, memory, accel, DeviceTree.from_state(device_tree),
                         vsock_carried=vsock_carried, lock_disks=lock_disks)
        vm = parts.vm(create_vcpus(accel, machine))
        vm.pause()      # no threads yet: holds the I/O thread and the timers, freezes guest time
        cleanup.pop_all()
    return vm


def finish_restore(vm: Vm, state: VmState) -> None:
    """The second half: `state` (of the machine and device tree prepare_vm built `vm` from)
    loaded into every part, the disk images locked, and `vm` started, paused. On an error
    `vm` is still the caller's to close."""
    if vm.device_manager is None or not same_tree(state.device_tree, vm.device_manager.tree.save()):
        raise StateError("vm state: device_tree: not the tree this VM was prepared from")
    if vm.accel.name != state.accelerator:
        assert vm.machine is not None
        state = _converted(state, vm.accel, vm.machine)
    for node in vm.device_manager.tree:
        device: Any = vm.device_manager.device(node.id)
        if hasattr(device, "take_back_image"):
            device.take_back_image()     # a no-op where the image is locked already
    vm.accel.restore(state.platform)
    # vCPUs (on KVM their LAPICs) before the devices: a device whose restore completes work
    # interrupts the guest then, and a LAPIC restored after would drop that interrupt.
    for vcpu, vcpu_state in zip(vm.vcpus, state.vcpus):
        vcpu.restore(vcpu_state)
    restore_devices(vm.device_manager, state.devices)
    vm.start()      # every run loop parks at its pause point
    serve_lost_kicks(vm)


def serve_lost_kicks(vm: Vm) -> None:
    """Kicks the saved VM took and had not served (queued for its I/O thread, or in an
    ioeventfd not yet read) went with it, and a driver with EVENT_IDX kicks again only once the
    device has caught up with avail_event: each virtio device serves its ready queues once when
    the restored VM resumes, as if kicked (a device with nothing available does nothing).
    Queued on the I/O thread, which the pause holds: nothing is done during the restore."""
    assert vm.iothread is not None
    for device in vm.devices.values():
        if isinstance(device, VirtioDevice):
            for index in range(len(device.queues)):
                vm.iothread.call_soon(functools.partial(device.notify, index))


def same_tree(one: DeviceTreeState, other: DeviceTreeState) -> bool:
    """The same devices with the same resources, in whatever order they were added."""
    return {node.id: node for node in one.nodes} == {node.id: node for node in other.nodes}


def _converted(state: VmState, accel, machine: MachineConfig) -> VmState:
    """`state` for `accel` of the other kind: what the guest saw kept (or refused), the
    platform converted."""
    platform, vcpus = across_accelerators(state.accelerator, state.platform, state.vcpus, state.guest_view,
                                          accel, CpuidPolicy(set(machine.cpu_hide)))
    return dataclasses.replace(state, accelerator=accel.name, platform=platform, vcpus=vcpus)


def restore_devices(manager, states: dict[str, State]) -> None:
    """Load every device's state (keyed as vm_state.save_devices keys them), all checked first.
    The PCI root gets its latch and its slots' functions in one restore (it unmaps every BAR
    before any is placed again)."""
    tree = manager.tree
    ids = {node.id for node in tree} - ({i for i in NEWER_DEVICE_IDS if i not in states})
    if sorted(states) != sorted(ids):
        odd = sorted(set(states) ^ ids)[0]
        raise StateError(f"vm state: devices: {odd!r} is {'not a device here' if odd in states else 'not saved'}")
    root_state = None
    plain: list[tuple[Any, State]] = []
    for node in tree:
        if node.id not in ids:
            continue
        target: Any = manager.transport(node.id) or manager.device(node.id)
        state = states[node.id]
        if node.kind == "pci-root":
            own = require(state, _pci_root.PciRootState)
            slots = {**own.devices, **{child.resources.pci_slot: states[child.id] for child in tree.children(node.id)}}
            root_state = (target, dataclasses.replace(own, devices=slots))
            target.check_restorable(root_state[1])
        elif node.transport == "virtio-pci":
            continue    # in the root's state
        else:
            if hasattr(target, "check_restorable"):
                target.check_restorable(state)
            else:
                require(state, type(target.save()))
            plain.append((target, state))
    for target, state in plain:
        target.restore(state)
    if root_state is not None:
        root_state[0].restore(root_state[1])
