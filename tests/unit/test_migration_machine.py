"""What a destination with a definition of its own accepts from the source's HELLO: the guest
must see the same machine; the host-side resources (disk paths, TAPs, sockets) are the
destination's."""

from __future__ import annotations

import dataclasses

import pytest

from pyvmm.config import DiskConfig, MachineConfig, NetConfig, VsockConfig
from pyvmm.migration.channel import MigrationError
from pyvmm.migration.machine import merge_machine
from pyvmm.vm_state import MachineDescription


def machine(**changes) -> MachineConfig:
    base = MachineConfig(kernel="/k", memory=64 << 20, cpus=2,
                         disks=(DiskConfig(path="/a/disk.img"),),
                         nets=(NetConfig(tap="tap-a", mac="52:54:00:00:00:01"),),
                         vsock=VsockConfig(cid=7, uds="/a/vsock"))
    return dataclasses.replace(base, **changes)


def test_the_destination_keeps_its_host_side_resources():
    incoming = MachineDescription.from_config(machine())
    local = machine(disks=(DiskConfig(path="/b/disk.img"),), nets=(NetConfig(tap="tap-b", mac="52:54:00:00:00:01"),),
                    vsock=VsockConfig(cid=7, uds="/b/vsock"))
    merged = merge_machine(incoming, local)
    assert merged.disks[0].path == "/b/disk.img" and merged.nets[0].tap == "tap-b" and merged.vsock.uds == "/b/vsock"
    assert (merged.memory, merged.cpus, merged.nets[0].mac, merged.vsock.cid) == (64 << 20, 2, "52:54:00:00:00:01", 7)
    assert merge_machine(incoming, None) is incoming


@pytest.mark.parametrize("change,message", [
    ({"memory": 128 << 20}, "memory is 64 MiB, this destination's is 128 MiB"),
    ({"cpus": 1}, "cpus is 2, this destination's is 1"),
    ({"disks": ()}, "has 1 disks, this destination's has 0"),
    ({"nets": (NetConfig(tap="tap-a", mac="52:54:00:00:00:02"),)}, "network interface 0 differs"),
    ({"vsock": VsockConfig(cid=8, uds="/a/vsock")}, "vsock CID is 7, this destination's is 8"),
    ({"vsock": None}, "has vsock device, this destination has none"),
])
def test_what_the_guest_would_see_differ_is_refused(change, message):
    with pytest.raises(MigrationError, match=message):
        merge_machine(MachineDescription.from_config(machine()), machine(**change))
