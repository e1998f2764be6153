"""What the source says about its VM before any memory moves, and what the destination checks.

HELLO carries the machine description (MachineDescription, as persist's dict), the
accelerator, the RAM layout and the device tree (so the destination can build the VM while
the guest still runs at the source). The destination refuses, in one line, a machine it cannot
continue: another accelerator, RAM that is not the layout its memory would be, or (for a
managed destination with a definition of its own) a guest-visible difference from that
definition — vCPUs, memory, the device list, MACs, the vsock CID. Host-side resources
(disk paths, TAP names, the vsock and console sockets) are the destination's own when it
has a definition, so each side can name its own TAP.

The VmState travels as a state file's bytes (snapshot.state_file.encode_state/decode_state:
one codec for snapshots and migration, versioned and checksummed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..arch.x86_64 import layout
from ..config import MachineConfig
from ..devmgr import DeviceTreeState
from ..persist import StateError
from ..vm_state import MachineDescription
from .channel import MigrationError, StreamError


def hello(state_machine: MachineDescription, accelerator: str, memory, device_tree: DeviceTreeState) -> dict[str, Any]:
    return {"machine": state_machine.to_dict(), "accelerator": accelerator,
            "ram": [[int(r.guest_base), r.size] for r in memory.regions], "device_tree": device_tree.to_dict()}


def read_hello(value: dict[str, Any]) -> tuple[MachineDescription, str, DeviceTreeState]:
    """The machine, accelerator and device tree a HELLO names, or one StreamError line."""
    try:
        machine = MachineDescription.from_dict(value["machine"])
        accelerator = value["accelerator"]
        ram = [tuple(pair) for pair in value["ram"]]
        device_tree = DeviceTreeState.from_dict(value["device_tree"])
    except StateError as exc:
        raise StreamError(f"the source's HELLO is not valid: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StreamError(f"the source's HELLO is not valid: {type(exc).__name__}: {exc}") from None
    wanted = [(spec.guest_base, spec.size) for spec in layout.memory_specs(machine.memory, machine.virtio_mem_size)]
    if ram != wanted:
        raise MigrationError(f"the source's RAM layout {ram} is not what {machine.memory >> 20} MiB is here ({wanted})")
    if accelerator not in ("kvm", "tcg"):
        raise MigrationError(f"the source runs on {accelerator!r}, which this pyvmm does not know")
    return machine, accelerator, device_tree


# Fields the guest sees: they must match. The rest (paths, TAP, sockets) are host-side.
_GUEST_FIELDS = ("memory", "cpus", "flat_64bit", "cpu_hide", "rng", "console", "console_transport", "balloon")


def merge_machine(incoming: MachineDescription, local: MachineConfig | None) -> MachineDescription:
    """The machine to continue: `incoming` with the host-side resources of the destination's
    own definition `local` (if any). MigrationError if the guest would see a difference."""
    if local is None:
        return incoming
    mine = MachineDescription.from_config(local)
    for name in _GUEST_FIELDS:
        if getattr(incoming, name) != getattr(mine, name):
            raise MigrationError(f"the incoming machine's {name} is {_show(getattr(incoming, name))}, "
                                 f"this destination's is {_show(getattr(mine, name))}")
    _same_count("disks", incoming.disks, mine.disks)
    _same_count("network interfaces", incoming.nets, mine.nets)
    _same_count("console ports", incoming.console_ports, mine.console_ports)
    for index, (theirs, ours) in enumerate(zip(incoming.disks, mine.disks)):
        if (theirs.readonly, theirs.transport, theirs.serial) != (ours.readonly, ours.transport, ours.serial):
            raise MigrationError(f"disk {index} differs (read-only, transport or serial) from this destination's")
    for index, (theirs_net, ours_net) in enumerate(zip(incoming.nets, mine.nets)):
        if theirs_net.transport != ours_net.transport or (ours_net.mac and theirs_net.mac != ours_net.mac):
            raise MigrationError(f"network interface {index} differs (MAC or transport) from this destination's")
    if (incoming.vsock is None) != (mine.vsock is None):
        raise MigrationError("the incoming machine " + ("has" if incoming.vsock else "has no") +
                             " vsock device, this destination " + ("has none" if incoming.vsock else "has one"))
    if incoming.vsock is not None and mine.vsock is not None and \
            (incoming.vsock.cid, incoming.vsock.transport) != (mine.vsock.cid, mine.vsock.transport):
        raise MigrationError(f"the incoming vsock CID is {incoming.vsock.cid}, this destination's is {mine.vsock.cid}")
    return dataclasses.replace(
        incoming,
        disks=tuple(dataclasses.replace(theirs, path=ours.path, vhost_user=ours.vhost_user)
                    for theirs, ours in zip(incoming.disks, mine.disks)),
        nets=tuple(dataclasses.replace(theirs, tap=ours.tap) for theirs, ours in zip(incoming.nets, mine.nets)),
        vsock=None if incoming.vsock is None or mine.vsock is None else
        dataclasses.replace(incoming.vsock, uds=mine.vsock.uds),
        console_ports=tuple(dataclasses.replace(theirs, socket=ours.socket)
                            for theirs, ours in zip(incoming.console_ports, mine.console_ports)))


def _same_count(what: str, theirs: tuple, ours: tuple) -> None:
    if len(theirs) != len(ours):
        raise MigrationError(f"the incoming machine has {len(theirs)} {what}, this destination's has {len(ours)}")


def _show(value: Any) -> str:
    if isinstance(value, int) and value >= 1 << 20:
        return f"{value >> 20} MiB"
    return repr(value)
