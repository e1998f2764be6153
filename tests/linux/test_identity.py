"""Restored guests are not twins (the default guest on the software CPU, in this process).

The default guest boots until its agent answers, is paused and saved; then several VMs are
restored from that one state and a copy of its memory. Restored as they are, two VMs are twins:
the same bytes from /dev/urandom, the wall clock of the moment of the save, the same vsock CID.
Restored with a new identity (identity.refresh_identity before resuming, the agent's
set_identity after), each reads different random bytes, tells the host's time, has its own
machine id, and answers its agent on a new CID (the device drops any packet from the old one).
"""

from __future__ import annotations

import time

from pyvmm.agent import AgentClient, AgentUnavailable, new_machine_id
from pyvmm.config import MachineConfig, VsockConfig
from pyvmm.identity import refresh_identity
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.restore import restore_vm

# One process, no pipeline: the kernel also draws random bytes for every exec (AT_RANDOM), so
# processes exec'ing in a scheduling-dependent order would make even twins read different bytes.
RANDOM = ["head", "-c", "16", "/dev/urandom"]
SINCE_SAVE = 5.0        # the restored twins' clocks stay this far behind
# Linux reseeds its CRNG from the input pool (into which interrupt timings are mixed, different
# in every run) when it is older than half the uptime in early boot. The guest is saved this
# long after boot, right after a reseed, so that twins read their first random bytes from the
# very same CRNG state: what they would share forever without the identity refresh.
UPTIME_AT_SAVE = 14.0


def copy_of(memory: GuestMemory) -> GuestMemory:
    copy = GuestMemory.from_specs([RegionSpec(int(r.guest_base), r.size) for r in memory.regions])
    for region in memory.regions:
        copy.view(int(region.guest_base), region.size)[:] = memory.view(int(region.guest_base), region.size)
    return copy


def test_restored_guests_are_not_twins(pyvmm, tmp_path):
    uds = str(tmp_path / "vsock")
    guest = pyvmm.in_process(MachineConfig(vsock=VsockConfig(cid=3, uds=uds)),
                             ["sh", "-c", "echo guest-ready; sleep 100000"])
    guest.vm.start()
    guest.wait_for(b"guest-ready")
    client = AgentClient(uds, connect_timeout=120)
    while float(client.read_file("/proc/uptime").split()[0]) < UPTIME_AT_SAVE:
        time.sleep(0.5)
    client.set_identity(new_machine_id())     # reseeds the CRNG now
    guest.vm.pause()
    state = guest.vm.save()
    saved_at = time.time()
    memory = copy_of(guest.vm.memory)
    guest.vm.close()
    try:
        while time.time() < saved_at + SINCE_SAVE:
            time.sleep(0.1)
        seen = [_restore(guest, state, memory, uds, refresh=refresh) for refresh in (False, False, True, True)]
    finally:
        memory.close()
    twin_a, twin_b, own_a, own_b = seen
    # restored as they are: twins
    assert twin_a["random"] == twin_b["random"]
    assert twin_a["cid"] == twin_b["cid"] == 3
    for twin in (twin_a, twin_b):
        assert twin["clock"] < twin["host_before"] - SINCE_SAVE + 2, twin
    # restored with their own identity: not
    assert len({own_a["random"], own_b["random"], twin_a["random"]}) == 3
    assert len({own_a["cid"], own_b["cid"], 3}) == 3
    assert own_a["machine_id"] != own_b["machine_id"]
    for own in (own_a, own_b):
        assert own["machine_id"] == own["given_machine_id"] + "\n"
        # `date +%s` truncates (up to 1 s) and the guest set the time it was sent when it got it
        # (the request's delay): within 2 s of the host, where the twins lag 3 s and more
        assert own["host_before"] - 2 <= own["clock"] <= own["host_after"] + 1, own
        # the agent answered through the device, which drops every packet from the old CID
        # (such as a socket of the old identity closing): the guest speaks from the new one
        assert own["saved_cid"] == own["cid"] and own["answered_on"] == own["cid"]
    guest.check_kernel_warnings()


def _restore(guest, state, memory, uds: str, *, refresh: bool) -> dict:
    vm = guest.vm = restore_vm(state, copy_of(memory), guest.console_write)
    vm.symbols = guest.symbols
    try:
        identity = refresh_identity(vm) if refresh else None
        vm.resume()
        client = AgentClient(uds, connect_timeout=60)
        seen: dict = {}
        if refresh:
            seen["given_machine_id"] = new_machine_id()
            client.set_identity(seen["given_machine_id"])
            seen["machine_id"] = client.read_file("/etc/machine-id").decode()
        try:
            seen["random"] = client.exec(RANDOM).stdout
        except AgentUnavailable as exc:   # seen twice in full-suite runs, never alone: say what stood where
            device = vm.device_manager.device("virtio-vsock")
            raise AssertionError(f"restore with refresh={refresh}: {exc}; vsock {device.counters()}, "
                                 f"CID change unacknowledged: {device.cid_change_pending}, "
                                 f"queues (last_avail, used_idx): {[(q.last_avail, q.used_idx) for q in device.queues]}; "
                                 f"console: {guest.text()[-1500:]!r}") from exc
        seen["host_before"] = time.time()
        seen["clock"] = int(client.exec(["date", "+%s"]).stdout)
        seen["host_after"] = time.time()
        device = vm.device_manager.device("virtio-vsock")
        seen["cid"] = device.guest_cid
        assert identity is None or identity.vsock_cid == device.guest_cid
        seen["answered_on"] = device.guest_cid if client.exec(["true"]).status == 0 else None
        vm.pause()
        seen["saved_cid"] = vm.save().machine.vsock.cid
        return seen
    finally:
        vm.close()
