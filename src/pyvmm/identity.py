"""A restored VM's own identity, so that no two VMs restored from one snapshot are twins.

What the VMM changes itself, on the paused VM right after the restore (`refresh_identity`):

- the VM generation ID (arch/x86_64/vmgenid.py): a new one in guest memory and the Generic
  Event Device's notification, on which a Linux guest with the vmgenid driver reseeds its
  random pool;
- the vsock CID: the device's config space shows a new one and the guest gets a
  TRANSPORT_RESET event (devices/virtio/vsock.py change_guest_cid); the VM's machine
  description records it, so a snapshot of this VM restores with it.

What only the guest can change (its wall clock, its machine id and, on kernels without the
vmgenid driver such as the default guest's, its random pool) the guest agent does once the VM
runs: agent.AgentClient.set_identity (the sandbox layer calls it after resume).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from dataclasses import dataclass, field

from .arch.x86_64 import layout
from .arch.x86_64.vmgenid import write_generation_id
from .vm import VmNotPaused

log = logging.getLogger(__name__)

VSOCK_ID = "virtio-vsock"
MIN_CID, MAX_CID = 3, 0xFFFFFFFE


@dataclass(frozen=True)
class Identity:
    """What refresh_identity gave a VM."""
    generation_id: bytes
    vsock_cid: int | None        # None: the VM has no vsock device
    # a clone's NICs: the snapshot's MAC -> the clone's (for the guest agent to apply:
    # AgentClient.set_mac_addresses), in NIC order
    macs: dict[str, str] = field(default_factory=dict)


def new_cid(old: int | None = None) -> int:
    """A random guest CID other than `old` (pyvmm's vsock host side is a Unix socket per VM, so
    CIDs need not be unique on the host; a fresh one keeps guests from being told apart by it)."""
    while True:
        cid = MIN_CID + secrets.randbelow(MAX_CID - MIN_CID + 1)
        if cid != old:
            return cid


def refresh_identity(vm, *, vsock_cid: int | None = None, generation_id: bytes | None = None) -> Identity:
    """Give paused `vm` (just restored) a new VM generation ID and, when it has vsock, a new
    guest CID (`vsock_cid`, default a random one); the guest learns both when it resumes."""
    if not vm.paused or vm.stopped:
        raise VmNotPaused("a VM's identity is refreshed while it is paused, before it resumes")
    written = write_generation_id(vm.memory, layout.VMGENID_ADDRESS, generation_id)
    vm.devices["ged"].new_vm_generation()
    cid = None
    if vm.machine.vsock is not None:
        device = vm.device_manager.device(VSOCK_ID)
        cid = new_cid(device.guest_cid) if vsock_cid is None else vsock_cid
        device.change_guest_cid(cid)
        vm.machine = dataclasses.replace(vm.machine, vsock=dataclasses.replace(vm.machine.vsock, cid=cid))
    log.info("new identity: VM generation ID %s, vsock CID %s", written.hex(), cid)
    return Identity(written, cid)
