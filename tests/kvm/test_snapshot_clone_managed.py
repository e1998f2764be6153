"""`pyvmm clone --from-snapshot STATE NEW_NAME` and Host.clone_from_snapshot: a snapshot taken
through the API (the counting tiny guest with a writable disk and a vsock device) started as
managed clones, each in a VM process of its own that loads it copy-on-write through PUT
/snapshot/load's `clone` field: each runs on from the snapshot's count, never restarted, with
its own disk copy, vsock socket and CID, and is defined with that configuration. (Its count is
in its own process's RAM: that the guest, which checks the count at every step and exits on a
mismatch, still runs shows it went on consistently.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.api.instance import VmInstance
from pyvmm.api.schema import VmSpec
from pyvmm.api.server import ApiServer
from pyvmm.guests import build_source
from pyvmm.manage.client import ApiClient, Host

COUNT = 0x300000


@pytest.fixture
def snapshot(accel, tmp_path):
    """A snapshot of the counting guest taken through the API: (state, mem, the count, disk)."""
    from pyvmm.accel.kvm.accelerator import install_kick_handler

    install_kick_handler()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"original".ljust(1 << 20, b"\0"))
    source = VmInstance("source", VmSpec(pyvmm={"accel": accel}))
    server = ApiServer(source, str(tmp_path / "source.sock")).start()
    try:
        api = ApiClient(str(tmp_path / "source.sock"))
        api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
        api.put("/boot-source", {"kernel_image_path": str(build_source(KVM_GUESTS / "counter.S", 64))})
        api.put("/drives/disk", {"drive_id": "disk", "path_on_host": str(disk), "is_root_device": False,
                                 "is_read_only": False})
        api.put("/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "source.vsock")})
        api.put("/actions", {"action_type": "InstanceStart"})
        deadline = time.monotonic() + 60
        while source.vm.memory.read_u64(COUNT) < 500:
            assert time.monotonic() < deadline, "the guest does not count"
            time.sleep(0.001)
        api.patch("/vm", {"state": "Paused"})
        paused_at = source.vm.memory.read_u64(COUNT)
        api.put("/snapshot/create", {"snapshot_path": str(tmp_path / "vm.state"),
                                     "mem_file_path": str(tmp_path / "vm.mem")})
        api.put("/pyvmm/actions", {"action_type": "Stop"})
    finally:
        server.close()
        if source.vm is not None:
            source.stop(wait=30)
    return tmp_path / "vm.state", tmp_path / "vm.mem", paused_at, disk


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}


def test_managed_clones_of_a_snapshot_run_each_their_own(snapshot, tmp_path, monkeypatch):
    state, mem, paused_at, disk = snapshot
    for name, value in _env(tmp_path).items():
        monkeypatch.setenv(name, value)
    host = Host()
    done = subprocess.run([sys.executable, "-m", "pyvmm.cli", "clone", "--from-snapshot", str(state), "--mem-file",
                           str(mem), "first"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Domain 'first' cloned from snapshot {state} and running"
    handles = [host.vm("first"), host.clone_from_snapshot(state, "second", mem_file=mem)]
    try:
        configs = [handle.config() for handle in handles]
        for handle, config, name in zip(handles, configs, ("first", "second")):
            assert handle.state() == "running"
            copy = tmp_path / f"{name}-disk0.img"
            assert config["drives"][0]["path_on_host"] == str(copy) and copy.read_bytes()[:8] == b"original"
            assert config["vsock"]["uds_path"] == str(tmp_path / f"{name}.vsock")
            assert name in host.names() and host.vm(name).config()["vsock"] == config["vsock"]
        cids = {config["vsock"]["guest_cid"] for config in configs}
        assert len(cids) == 2 and 3 not in cids
        assert disk.read_bytes()[:8] == b"original"
        # the guest checks its count against a register at every step and exits on a mismatch:
        # clones still running a while later have continued consistently
        time.sleep(1)
        assert [handle.state() for handle in handles] == ["running", "running"]
    finally:
        for handle in handles:
            handle.destroy()
    again = subprocess.run([sys.executable, "-m", "pyvmm.cli", "clone", "--from-snapshot", str(state), "--mem-file",
                            str(mem), "first"], capture_output=True, text=True, timeout=120)
    assert (again.returncode, again.stderr.strip()) == (2, "pyvmm: error: a VM named 'first' exists already")
