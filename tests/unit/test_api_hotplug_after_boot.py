"""Hotplug over the per-VM API after InstanceStart (tiny guest on the software CPU:
guests/counter.S; the guest's eject is written to the PCI hotplug controller as its _EJ0 would).

A detach over the per-VM API that times out (the guest has not ejected the device yet) is a
400 and the device stays; when the guest ejects it later, the device leaves the device tree
and GET /vm/config follows, with no further request. The vsock and entropy devices plug in
once each (PUT /vsock, PUT /entropy) and leave (DELETE), a second one a 400 in one line."""

from __future__ import annotations

import time

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.api.instance import VmInstance
from pyvmm.api.schema import VmSpec
from pyvmm.api.server import ApiServer
from pyvmm.builder import PCI_HOTPLUG_ID
from pyvmm.devices.legacy.pci_hotplug import EJECTED
from pyvmm.guests import build_source
from pyvmm.manage.client import ApiClient, ApiError


@pytest.fixture
def running(tmp_path):
    instance = VmInstance("late", VmSpec(pyvmm={"accel": "tcg"}))
    server = ApiServer(instance, str(tmp_path / "api.sock")).start()
    api = ApiClient(str(tmp_path / "api.sock"), timeout=30)
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
    api.put("/boot-source", {"kernel_image_path": str(build_source(KVM_GUESTS / "counter.S", 64))})
    api.put("/actions", {"action_type": "InstanceStart"})
    try:
        yield instance, api
    finally:
        if instance.vm is not None and not instance.vm.stopped:
            instance.stop(wait=30)
        server.close()


def test_a_late_eject_reaches_the_device_tree_and_the_config(running, tmp_path):
    instance, api = running
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(8192))
    api.put("/drives/data", {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False})
    assert [d["drive_id"] for d in api.get("/vm/config")["drives"]] == ["data"]
    with pytest.raises(ApiError) as error:
        api.request("DELETE", "/drives/data?timeout=0.2")
    assert error.value.status == 400 and "has not released data" in error.value.fault_message
    assert [d["drive_id"] for d in api.get("/vm/config")["drives"]] == ["data"]   # still there: the guest has it

    vm = instance.vm
    slot = vm.device_manager.tree.get("data").resources.pci_slot
    vm.devices[PCI_HOTPLUG_ID].write(EJECTED, (1 << slot).to_bytes(4, "little"))   # the guest lets go, late
    deadline = time.monotonic() + 20
    while api.get("/vm/config")["drives"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get("/vm/config")["drives"] == []
    assert "data" not in vm.device_manager.tree and vm.machine.disks == ()
    api.put("/drives/data", {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False})   # id free again
    assert [d["drive_id"] for d in api.get("/vm/config")["drives"]] == ["data"]


def _fault(call) -> str:
    with pytest.raises(ApiError) as error:
        call()
    assert error.value.status == 400 and "\n" not in error.value.fault_message
    return error.value.fault_message


def test_the_vsock_and_entropy_devices_plug_in_once_and_leave(running, tmp_path):
    instance, api = running
    uds = str(tmp_path / "v.sock")
    api.put("/entropy", {})
    api.put("/vsock", {"guest_cid": 5, "uds_path": uds})
    config = api.get("/vm/config")
    assert config["entropy"] == {} and config["vsock"]["guest_cid"] == 5
    assert {"virtio-rng", "virtio-vsock"} <= {node["id"] for node in api.get("/pyvmm/devices")}
    assert "one per VM" in _fault(lambda: api.put("/entropy", {}))
    assert "one per VM" in _fault(lambda: api.put("/vsock", {"guest_cid": 6, "uds_path": uds + "2"}))
    api.request("DELETE", "/entropy?force=true")
    api.request("DELETE", "/vsock?force=true")
    config = api.get("/vm/config")
    assert config.get("entropy") is None and config.get("vsock") is None
    assert "no entropy device" in _fault(lambda: api.request("DELETE", "/entropy"))
    assert not instance.vm.stopped


def test_a_snapshot_after_hotplug_loads_with_the_devices_which_then_leave(running, tmp_path):
    instance, api = running
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(8192))
    api.put("/drives/data", {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False})
    api.put("/entropy", {})
    api.patch("/vm", {"state": "Paused"})
    state, mem = str(tmp_path / "vm.state"), str(tmp_path / "vm.mem")
    api.put("/snapshot/create", {"snapshot_path": state, "mem_file_path": mem, "snapshot_type": "Full"})
    instance.stop(wait=30)

    loaded = VmInstance("loaded")     # the accelerator is the state's
    server = ApiServer(loaded, str(tmp_path / "loaded.sock")).start()
    try:
        api2 = ApiClient(str(tmp_path / "loaded.sock"), timeout=30)
        api2.put("/snapshot/load", {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem},
                                    "resume_vm": True})
        config = api2.get("/vm/config")
        assert [d["drive_id"] for d in config["drives"]] == ["data"] and config["entropy"] == {}
        assert {"data", "virtio-rng"} <= {node["id"] for node in api2.get("/pyvmm/devices")}
        api2.request("DELETE", "/drives/data?force=true")
        api2.request("DELETE", "/entropy?force=true")
        config = api2.get("/vm/config")
        assert config["drives"] == [] and config.get("entropy") is None
        assert not {"data", "virtio-rng"} & {node["id"] for node in api2.get("/pyvmm/devices")}
    finally:
        if loaded.vm is not None:
            loaded.stop(wait=30)
        server.close()
