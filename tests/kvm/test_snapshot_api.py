"""Firecracker's snapshot resources through the per-VM API, on both accelerators, with a guest
that counts for ever (guests/counter.S): PUT /snapshot/create on a paused VM (400 unless
paused), PUT /snapshot/load into a fresh instance in each restore mode (400 once configured
or started), and the loaded VM counts on from where it stood, never restarted."""

from __future__ import annotations

import os
import time

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.api.instance import VmInstance
from pyvmm.api.schema import VmSpec
from pyvmm.api.server import ApiServer
from pyvmm.guests import build_source
from pyvmm.manage.client import ApiClient, ApiError
from pyvmm.snapshot import merge_diff

COUNT, STARTS = 0x300000, 0x300010


@pytest.fixture
def serve(tmp_path):
    """Serves VmInstances on API sockets in this process (requests run on the server's threads:
    the KVM kick handler is installed from the main thread first, as a VM process does)."""
    from pyvmm.accel.kvm.accelerator import install_kick_handler

    install_kick_handler()
    servers = []

    def start(instance: VmInstance) -> ApiClient:
        path = str(tmp_path / f"api{len(servers)}.sock")
        servers.append((instance, ApiServer(instance, path).start()))
        return ApiClient(path)

    yield start
    for instance, server in servers:
        server.close()
        if instance.vm is not None:
            instance.stop(wait=30)


def _counting_past(instance: VmInstance, count: int) -> int:
    deadline = time.monotonic() + 60
    while instance.vm.memory.read_u64(COUNT) <= count:
        assert time.monotonic() < deadline and not instance.vm.stopped, "the guest does not count"
        time.sleep(0.001)
    return instance.vm.memory.read_u64(COUNT)


def _fault(call) -> str:
    with pytest.raises(ApiError) as error:
        call()
    assert error.value.status == 400
    assert "\n" not in error.value.fault_message
    return error.value.fault_message


def _snapshotted(accel, serve, tmp_path):
    """A counting VM started through the API, snapshotted (Full) while paused, then stopped:
    (the count at the snapshot, state path, memory path)."""
    kernel = str(build_source(KVM_GUESTS / "counter.S", 64))
    source = VmInstance("source", VmSpec(pyvmm={"accel": accel}))
    api = serve(source)
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
    api.put("/boot-source", {"kernel_image_path": kernel})
    api.put("/actions", {"action_type": "InstanceStart"})
    _counting_past(source, 500)
    state, mem = str(tmp_path / "vm.state"), str(tmp_path / "vm.mem")
    assert _fault(lambda: api.put("/snapshot/create", {"snapshot_path": state, "mem_file_path": mem})) == \
        'the VM must be paused to create a snapshot (PATCH /vm {"state": "Paused"})'
    api.patch("/vm", {"state": "Paused"})
    paused_at = source.vm.memory.read_u64(COUNT)
    assert api.put("/snapshot/create", {"snapshot_path": state, "mem_file_path": mem, "snapshot_type": "Full"}) is None
    assert api.get("/")["state"] == "Paused" and source.vm.memory.read_u64(COUNT) == paused_at
    api.put("/pyvmm/actions", {"action_type": "Stop"})
    return paused_at, state, mem


@pytest.mark.parametrize("mode", ["copy", "cow", "uffd"])
def test_a_snapshot_created_through_the_api_loads_through_it(accel, serve, tmp_path, mode):
    paused_at, state, mem = _snapshotted(accel, serve, tmp_path)
    target = VmInstance("target")
    api = serve(target)
    api.put("/snapshot/load", {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem},
                               "restore_mode": mode})
    assert api.get("/")["state"] == "Paused"
    assert target.vm.accel.name == accel and target.vm.memory.read_u64(COUNT) == paused_at
    assert api.get("/vm/config")["machine-config"]["mem_size_mib"] == 16      # recorded with the state
    api.patch("/vm", {"state": "Resumed"})
    _counting_past(target, paused_at + 1000)
    assert target.vm.memory.read_u64(STARTS) == 1 and not target.vm.stopped   # went on, never restarted
    assert _fault(lambda: api.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": mem})) == \
        "a snapshot can only be loaded before InstanceStart, into a fresh VM"


def test_resume_vm_dirty_tracking_and_a_diff_through_the_api(accel, serve, tmp_path):
    paused_at, state, mem = _snapshotted(accel, serve, tmp_path)
    target = VmInstance("target")
    api = serve(target)
    api.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": mem, "resume_vm": True,
                               "track_dirty_pages": True})
    assert api.get("/")["state"] == "Running"
    _counting_past(target, paused_at + 500)
    api.patch("/vm", {"state": "Paused"})
    diff_at = target.vm.memory.read_u64(COUNT)
    diff_state, diff = str(tmp_path / "diff.state"), str(tmp_path / "vm.diff")
    api.put("/snapshot/create", {"snapshot_path": diff_state, "mem_file_path": diff, "snapshot_type": "Diff"})
    api.put("/pyvmm/actions", {"action_type": "Stop"})
    merge_diff(diff, mem)
    again = VmInstance("again")
    api = serve(again)
    api.put("/snapshot/load", {"snapshot_path": diff_state, "mem_file_path": mem})
    assert again.vm.memory.read_u64(COUNT) == diff_at
    api.patch("/vm", {"state": "Resumed"})
    _counting_past(again, diff_at + 500)
    assert again.vm.memory.read_u64(STARTS) == 1


def test_bad_loads_are_400_with_one_line(accel, serve, tmp_path):
    paused_at, state, mem = _snapshotted(accel, serve, tmp_path)
    api = serve(VmInstance("target"))
    short = tmp_path / "short.mem"
    with open(short, "wb") as out:
        out.truncate(4096)
    corrupt = tmp_path / "corrupt.state"
    data = bytearray(open(state, "rb").read())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    file_backend = {"backend_type": "File", "backend_path": mem}
    assert _fault(lambda: api.put("/snapshot/load", {"snapshot_path": state})) == \
        "mem_backend give mem_backend or (deprecated) mem_file_path, exactly one"
    assert _fault(lambda: api.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": mem,
                                                     "mem_backend": file_backend})) == \
        "mem_backend give mem_backend or (deprecated) mem_file_path, exactly one"
    assert _fault(lambda: api.put("/snapshot/load", {"snapshot_path": str(corrupt), "mem_file_path": mem})) == \
        f"{corrupt}: bad checksum: the state file is corrupted"
    assert _fault(lambda: api.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": str(short)})) == \
        f"{short}: the memory file holds 4096 bytes, the snapshot's guest RAM is 16777216 bytes (16 MiB)"
    assert _fault(lambda: api.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": mem,
                                                     "network_overrides": [{"iface_id": "eth9",
                                                                            "host_dev_name": "tap9"}]})) == \
        "network_overrides[0].iface_id 'eth9' is not an interface of the snapshot (it has: none)"
    assert _fault(lambda: api.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": mem,
                                                     "vsock_override": {"uds_path": "/tmp/v.sock"}})) == \
        "vsock_override the snapshot's VM has no vsock device"
    assert _fault(lambda: api.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": mem,
                                                     "restore_mode": "uffd",
                                                     "mem_backend": {"backend_type": "Uffd",
                                                                     "backend_path": "/x"}})) != ""
    assert api.get("/")["state"] == "Not started"     # nothing loaded by any of them
    configured = serve(VmInstance("configured"))
    configured.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
    assert _fault(lambda: configured.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": mem})) == \
        "a snapshot can only be loaded before any resource but the logger and metrics is configured"
    # the good files still load
    api.put("/snapshot/load", {"snapshot_path": state, "mem_backend": file_backend})
    assert os.path.exists(mem)


def test_a_uffd_backend_is_served_by_a_handler_listening_on_its_socket(accel, serve, tmp_path):
    """Firecracker's mem_backend Uffd: a page-fault handler started beforehand listens at
    backend_path with the memory file; the VMM sends it the userfaultfd and the mappings."""
    import subprocess
    import sys

    paused_at, state, mem = _snapshotted(accel, serve, tmp_path)
    sock = str(tmp_path / "uffd.sock")
    handler = subprocess.Popen([sys.executable, "-m", "pyvmm.snapshot.uffd_handler", "--socket", sock,
                                "--mem-file", mem])
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert handler.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        target = VmInstance("target")
        api = serve(target)
        api.put("/snapshot/load", {"snapshot_path": state, "resume_vm": True,
                                   "mem_backend": {"backend_type": "Uffd", "backend_path": sock}})
        _counting_past(target, paused_at + 500)
        assert target.vm.memory.read_u64(STARTS) == 1
        api.put("/pyvmm/actions", {"action_type": "Stop"})
        assert handler.wait(30) == 0        # done once the VM let go of it
    finally:
        handler.kill()
        handler.wait()


def test_pyvmm_firecracker_loads_a_snapshot_through_its_api(accel, serve, tmp_path):
    """The Firecracker drop-in started with only an API socket, as Firecracker's users start it,
    loads the snapshot and resumes it (the VM is built on the API server's thread)."""
    import signal
    import subprocess
    import sys

    paused_at, state, mem = _snapshotted(accel, serve, tmp_path)
    sock = str(tmp_path / "fc.sock")
    launcher = subprocess.Popen([sys.executable, "-m", "pyvmm.cli", "firecracker", "--api-sock", sock],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
            time.sleep(0.02)
        api = ApiClient(sock)
        api.put("/snapshot/load", {"snapshot_path": state, "resume_vm": True,
                                   "mem_backend": {"backend_type": "File", "backend_path": mem}})
        assert api.get("/")["state"] == "Running"
        assert api.get("/vm/config")["machine-config"]["mem_size_mib"] == 16
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(60)


def test_vsock_override_moves_the_loaded_vms_socket(accel, serve, tmp_path):
    kernel = str(build_source(KVM_GUESTS / "counter.S", 64))
    source = VmInstance("source", VmSpec(pyvmm={"accel": accel}))
    api = serve(source)
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
    api.put("/boot-source", {"kernel_image_path": kernel})
    api.put("/vsock", {"guest_cid": 7, "uds_path": str(tmp_path / "a.sock")})
    api.put("/actions", {"action_type": "InstanceStart"})
    _counting_past(source, 100)
    api.patch("/vm", {"state": "Paused"})
    state, mem = str(tmp_path / "vm.state"), str(tmp_path / "vm.mem")
    api.put("/snapshot/create", {"snapshot_path": state, "mem_file_path": mem})
    api.put("/pyvmm/actions", {"action_type": "Stop"})
    target = VmInstance("target")
    api = serve(target)
    api.put("/snapshot/load", {"snapshot_path": state, "mem_file_path": mem,
                               "vsock_override": {"uds_path": str(tmp_path / "b.sock")}})
    assert target.vm.machine.vsock.uds == str(tmp_path / "b.sock") and os.path.exists(tmp_path / "b.sock")
    assert api.get("/vm/config")["vsock"] == {"guest_cid": 7, "uds_path": str(tmp_path / "b.sock")}
