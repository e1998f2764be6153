"""Stopping or rebooting a paused VM through the API ends it as it stands: the stop wakes
the parked run loops by itself, and nothing resumes the VM (its I/O thread's pending work,
its timers and guest time stay held) on the way out. A stop that reaches a VM already closed
(the old one, during a reboot) is harmless."""

from __future__ import annotations

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.api.instance import VmInstance
from pyvmm.api.schema import VmSpec
from pyvmm.guests import build_source
from test_snapshot_api import _counting_past, serve  # noqa: F401 - serve is a fixture


@pytest.mark.parametrize("how", ["stop", "reboot"])
def test_a_paused_vm_is_stopped_without_being_resumed(accel, serve, how):  # noqa: F811
    instance = VmInstance("paused", VmSpec(pyvmm={"accel": accel}))
    api = serve(instance)
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
    api.put("/boot-source", {"kernel_image_path": str(build_source(KVM_GUESTS / "counter.S", 64))})
    api.put("/actions", {"action_type": "InstanceStart"})
    _counting_past(instance, 500)
    api.patch("/vm", {"state": "Paused"})
    vm = instance.vm
    resumed: list[bool] = []
    real_resume = vm.resume
    vm.resume = lambda: (resumed.append(True), real_resume())[1]
    if how == "stop":
        instance.stop(wait=30)
        assert instance.ended.is_set()
    else:
        instance.reboot()
        assert vm.wait(30) is not None
    assert vm.outcome.reason == ("destroyed" if how == "stop" else "reset")
    assert resumed == []
    if how == "reboot":
        instance.stop(wait=30)  # whichever VM the instance holds now (while rebooting: the old, closed one)
