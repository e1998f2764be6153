"""PCI hotplug of virtio devices into a running VM: disks and NICs plugged in and pulled out,
and the VM's one vsock and one entropy device (virtio-rng) when it has none. Console ports and
the balloon are not hot-pluggable (fixed when the machine is built; the front ends say so).

Attaching: the device is made as the builder makes it (its image or TAP opened), put in the
lowest free root-bus slot while the VM is paused for a moment (the device tree records it,
the PCI root maps it), and the guest is told through the ACPI hotplug controller
(devices/legacy/pci_hotplug.py): Linux's acpiphp scans the slot and binds the driver, no
rescan needed. Detaching: the guest is asked to eject the slot; once it has (its driver let
go, _EJ0 ran) the device leaves the buses and the tree and its host side is closed. A guest
that does not eject in time gets a one-line error and keeps the device; `force` takes it away
anyway, which the guest's driver does not expect: requests it has in flight never complete
and whatever it had not written back is lost.

The machine description (vm.machine) follows every change, so a snapshot, a clone or a
migration of the VM carries the hot-plugged devices; a device keeps its id wherever it sits
in the description (explicit ids once another device left: indices shift, ids must not).
virtio-mmio devices cannot be hot-plugged: the guest learns of them from the DSDT, built once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from .builder import PCI_HOTPLUG_ID, RNG_ID, VSOCK_ID, make_disk, make_net, make_vsock
from .config import DiskConfig, MachineConfig, NetConfig, VsockConfig
from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_EJECT_TIMEOUT = 60.0
CPU_EJECT_RETRY = 5.0
HOTPLUGGABLE_KINDS = ("virtio-blk", "vhost-user-blk", "virtio-net", "virtio-rng", "virtio-vsock")
MMIO_NOT_HOTPLUGGABLE = ("virtio-mmio devices are not hot-pluggable (the guest finds them in the ACPI tables "
                         "built at boot): use transport=pci")

_lock = threading.Lock()   # one change at a time, whoever asks


class HotplugError(UserError):
    """A device cannot be attached or detached; the VM is as it was."""


def _running(vm) -> None:
    if vm.stopped:
        raise HotplugError("the VM has stopped")
    if vm.assembly is None or vm.machine is None:
        raise HotplugError("this VM was not built by pyvmm's builder: it has no hotplug controller")


def _next_id(vm, prefix: str) -> str:
    taken = {node.id for node in vm.device_manager.tree}
    return next(f"{prefix}{n}" for n in range(len(taken) + 1) if f"{prefix}{n}" not in taken)


def _check_new_id(vm, device_id: str) -> None:
    if device_id in vm.device_manager.tree:
        raise HotplugError(f"{device_id!r}: a device with that id exists already")


def attach_disk(vm, disk: DiskConfig) -> str:
    """Plug `disk` into running `vm`; its device id (disk.id, or virtio-blkN)."""
    if disk.transport != "pci":
        raise HotplugError(MMIO_NOT_HOTPLUGGABLE)
    with _lock:
        _running(vm)
        device_id = disk.id or _next_id(vm, "virtio-blk")
        _check_new_id(vm, device_id)
        disk = dataclasses.replace(disk, id=device_id)
        machine = dataclasses.replace(vm.machine, disks=(*vm.machine.disks, disk))
        _validate(machine)
        device, kind = make_disk(disk, f"disks[{len(machine.disks) - 1}]", vm.iothread, vm.assembly.transfers)
        _plug(vm, machine, device_id, kind, device, device.close)
        return device_id


def attach_net(vm, net: NetConfig) -> str:
    """Plug a NIC on `net`'s TAP into running `vm`; its device id (net.id, or virtio-netN)."""
    if net.transport != "pci":
        raise HotplugError(MMIO_NOT_HOTPLUGGABLE)
    with _lock:
        _running(vm)
        device_id = net.id or _next_id(vm, "virtio-net")
        _check_new_id(vm, device_id)
        net = dataclasses.replace(net, id=device_id)
        machine = _frozen(vm.machine)
        index = len(machine.nets)
        machine = dataclasses.replace(machine, nets=(*machine.nets, net))
        net = dataclasses.replace(net, mac=machine.net_mac(index))
        machine = dataclasses.replace(machine, nets=(*machine.nets[:-1], net))
        _validate(machine)
        device, release = make_net(net, machine.net_mac(index), vm.iothread)
        _plug(vm, machine, device_id, "virtio-net", device, release)
        return device_id


def attach_rng(vm, transport: str = "pci") -> str:
    """Plug the VM's entropy device (virtio-rng) in; its device id. One per VM."""
    from .devices.virtio.rng import VirtioRng

    if transport != "pci":
        raise HotplugError(MMIO_NOT_HOTPLUGGABLE)
    with _lock:
        _running(vm)
        if RNG_ID in vm.device_manager.tree:
            raise HotplugError("the VM has an entropy device (virtio-rng) already: one per VM")
        machine = dataclasses.replace(_frozen(vm.machine), rng=transport)
        _validate(machine)
        _plug(vm, machine, RNG_ID, "virtio-rng", VirtioRng(), lambda: None)
        return RNG_ID


def attach_vsock(vm, vsock: VsockConfig) -> str:
    """Plug the VM's vsock device in (the guest's CID, host side on Unix sockets at vsock.uds);
    its device id. One per VM: the CID is the guest's address."""
    if vsock.transport != "pci":
        raise HotplugError(MMIO_NOT_HOTPLUGGABLE)
    with _lock:
        _running(vm)
        if VSOCK_ID in vm.device_manager.tree:
            raise HotplugError("the VM has a vsock device already: one per VM (its CID is the guest's address)")
        machine = dataclasses.replace(_frozen(vm.machine), vsock=vsock)
        _validate(machine)
        releases: list = []
        try:
            device = make_vsock(vsock, vm.iothread, releases)
        except OSError as exc:
            for release in reversed(releases):
                release()
            raise HotplugError(f"vsock.uds: cannot listen on {vsock.uds}: {exc.strerror or exc}") from None
        _plug(vm, machine, VSOCK_ID, "virtio-vsock", device, lambda: [release() for release in reversed(releases)])
        return VSOCK_ID


def _validate(machine: MachineConfig) -> None:
    from .errors import ConfigError

    try:
        machine.validate()
    except ConfigError as exc:
        raise HotplugError(exc.render(exc.field or "device")) from None


def _plug(vm, machine: MachineConfig, device_id: str, kind: str, device, release) -> None:
    parts = vm.assembly
    controller = vm.devices[PCI_HOTPLUG_ID]
    vm.pause()
    try:
        try:
            parts.wiring.add(device_id, kind, device, "pci")
        except BaseException:
            release()
            raise
        slot = vm.device_manager.tree.get(device_id).resources.pci_slot
        vm.devices[device_id] = device
        parts.releases.append(release)
        parts.device_releases[device_id] = [release]
        vm.machine = parts.config = machine
        log.info("%s (%s) plugged into PCI slot %d", device_id, kind, slot)
    finally:
        vm.resume()
    controller.device_inserted(slot)


def detach(vm, device_id: str, *, timeout: float = DEFAULT_EJECT_TIMEOUT, force: bool = False,
           on_unplugged: Callable[[], None] | None = None) -> None:
    """Take device `device_id` out of running `vm` once the guest has ejected it; `force`:
    without waiting for the guest. A guest that has not ejected it within `timeout` seconds
    gets a HotplugError; the request stays, and the device leaves when the guest lets it go.
    `on_unplugged()` runs once the device has left, whenever that is (a late eject included),
    so that views kept beside the VM (the API's configuration) follow the guest."""
    with _lock:
        _running(vm)
        manager = vm.device_manager
        node = manager.tree.get(device_id)
        if node is None:
            raise HotplugError(f"{device_id!r}: no such device")
        if node.transport == "virtio-mmio":
            raise HotplugError(f"{device_id}: {MMIO_NOT_HOTPLUGGABLE}")
        if node.kind not in HOTPLUGGABLE_KINDS or node.resources.pci_slot is None:
            raise HotplugError(f"{device_id} ({node.kind}) cannot be unplugged "
                               f"(hot-pluggable: {', '.join(HOTPLUGGABLE_KINDS)} on PCI)")
        slot = node.resources.pci_slot
        controller = vm.devices[PCI_HOTPLUG_ID]
        controller.request_eject(slot)
        if force:
            _unplug(vm, device_id, slot)
            if on_unplugged is not None:
                on_unplugged()
            return
    if _wait_and_unplug(vm, device_id, slot, timeout, on_unplugged):
        return
    threading.Thread(target=_wait_and_unplug, args=(vm, device_id, slot, None, on_unplugged),
                     name=f"pyvmm-unplug-{device_id}", daemon=True).start()
    raise HotplugError(f"the guest has not released {device_id} within {timeout:g} s (is it in use, or does the "
                       f"guest lack ACPI PCI hotplug?); it stays attached until the guest ejects it "
                       f"(--force unplugs it now, losing the guest's requests in flight)")


def _wait_and_unplug(vm, device_id: str, slot: int, timeout: float | None,
                     on_unplugged: Callable[[], None] | None = None) -> bool:
    """Wait (`timeout` seconds, None: while the VM runs) for the guest's eject of `slot`, then
    unplug `device_id` if it is still there (and call `on_unplugged`); whether the guest ejected it."""
    controller = vm.devices[PCI_HOTPLUG_ID]
    waited = 0.0
    while timeout is None or waited < timeout:
        step = 1.0 if timeout is None else min(1.0, timeout - waited)
        if controller.wait_ejected(slot, step):
            with _lock:
                node = vm.device_manager.tree.get(device_id)
                unplugging = not vm.stopped and node is not None and node.resources.pci_slot == slot
                if unplugging:
                    _unplug(vm, device_id, slot)
            if unplugging and on_unplugged is not None:
                on_unplugged()
            return True
        waited += step
        if vm.stopped:
            return False
    return False


def _unplug(vm, device_id: str, slot: int) -> None:
    parts = vm.assembly
    machine = _frozen(vm.machine)
    machine = dataclasses.replace(
        machine, disks=tuple(d for d in machine.disks if d.id != device_id),
        nets=tuple(n for n in machine.nets if n.id != device_id),
        rng=None if device_id == RNG_ID else machine.rng, vsock=None if device_id == VSOCK_ID else machine.vsock)
    vm.pause()
    try:
        transport = vm.device_manager.transport(device_id)
        parts.pci_root.remove_device(slot)
        transport.reset()       # the device lets go of its queues (a NIC stops watching its TAP)
        device = vm.devices.pop(device_id)
        vm.device_manager.remove(device_id)
        vm.machine = parts.config = machine
    finally:
        vm.resume()
    # Closed once the I/O thread has done the reset's work (a NIC's TAP leaves its watch first),
    # here and not on the I/O thread: a tap=auto NIC's namespace goes with `ip`, a new process,
    # which the I/O thread's seccomp filter refuses.
    releases = parts.device_releases.pop(device_id, [])
    for release in releases:
        parts.releases.remove(release)
    caught_up = threading.Event()
    vm.iothread.call_soon(caught_up.set)
    caught_up.wait(30)
    for release in releases:
        release()
    log.info("%s (%s) unplugged from PCI slot %d", device_id, type(device).__name__, slot)


def _frozen(machine: MachineConfig) -> MachineConfig:
    """`machine` with every disk and NIC naming its id (and MAC) explicitly, so that removing
    one leaves the others' ids and MACs as they are."""
    return dataclasses.replace(
        machine,
        disks=tuple(dataclasses.replace(d, id=machine.disk_id(i)) for i, d in enumerate(machine.disks)),
        nets=tuple(dataclasses.replace(n, id=machine.net_id(i), mac=machine.net_mac(i))
                   for i, n in enumerate(machine.nets)))


# --- vCPUs ---------------------------------------------------------------------------------------


def set_vcpus(vm, count: int, *, timeout: float = DEFAULT_EJECT_TIMEOUT) -> None:
    """Plug vCPUs in or take them out until `vm` has `count` (CPU hotplug; the VM needs
    max_cpus). New vCPUs are the next indices, removed ones the highest: the guest is asked to
    eject each (Linux offlines the CPU first) and HotplugError comes after `timeout` seconds
    without it, the vCPU kept. The boot CPU never leaves."""
    from .arch.x86_64.cpuid import CpuidPolicy
    from .builder import CPU_HOTPLUG_ID

    with _lock:
        _running(vm)
        machine = vm.machine
        controller = vm.devices.get(CPU_HOTPLUG_ID)
        if controller is None:
            raise HotplugError("this VM cannot change its vCPUs: start it with a maximum above its count "
                               "(max_vcpus in a definition, --max-cpus)")
        if not 1 <= count <= machine.possible_cpus:
            raise HotplugError(f"{count} vCPUs: this VM can have 1 to {machine.possible_cpus} (its maximum)"
                               + (" (the boot CPU cannot be removed)" if count < 1 else ""))
        while len(vm.vcpus) < count:
            index = len(vm.vcpus)
            vm.pause()
            try:
                vcpu = vm.accel.create_vcpu(index, machine.possible_cpus, CpuidPolicy(set(machine.cpu_hide)))
                vm.vcpus.append(vcpu)
                loops = vm.accel.run_loops(vm) if not vm.stopped else []
                # An accelerator with a thread per vCPU gives the new one its own loop; the
                # software CPU's scheduler runs it with the others.
                own = [loop for loop in loops if loop.vcpus == [vcpu]]
                if vcpu.thread_ident is not None:   # unplugged before, its thread parked (KVM)
                    vm.wake_unplugged()
                elif own:
                    vm.start_run_loop(own[0])
                else:
                    vcpu.thread_ident = vm.vcpus[0].thread_ident
                machine = dataclasses.replace(machine, cpus=index + 1)
                vm.machine = vm.assembly.config = machine
            finally:
                vm.resume()
            controller.inserted(index)
            log.info("vCPU %d plugged in", index)
    while True:
        with _lock:
            _running(vm)
            if len(vm.vcpus) <= count:
                return
            index = len(vm.vcpus) - 1
            remove = vm.accel.remove_vcpu
        if not _eject_cpu(controller, index, timeout):
            raise HotplugError(f"the guest has not released vCPU {index} within {timeout:g} s (it may refuse to "
                               f"take the CPU offline); the VM keeps {index + 1} vCPUs")
        with _lock:
            vm.pause()
            try:
                vcpu = vm.vcpus.pop()
                remove(vcpu)
                controller.removed(index)
                vm.machine = vm.assembly.config = dataclasses.replace(vm.machine, cpus=index)
            finally:
                vm.resume()
            log.info("vCPU %d unplugged", index)


def _eject_cpu(controller, index: int, timeout: float) -> bool:
    """Ask the guest to eject vCPU `index`, again every few seconds: Linux drops a request it
    cannot act on at once (the CPU busy going online), and acting on one twice is harmless."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        controller.request_eject(index)
        if controller.wait_ejected(index, min(left, CPU_EJECT_RETRY)):
            return True
    return False
