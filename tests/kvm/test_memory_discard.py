"""Giving guest RAM back while a tiny guest runs, on KVM and on the software CPU: the counting
guest (helpers/counter_guest.py) has a balloon device, pages it does not use are discarded
(as an inflate does), they leave the host's RAM and read as zero, and the guest counts on to
its end undisturbed; a snapshot of the VM keeps the discarded pages as holes and carries the
balloon's state, and the saved VM continues in a new one with its balloon."""

from __future__ import annotations

import dataclasses
import json
import os

from helpers.counter_guest import COUNT, counter_config, counting_vm, finish
from pyvmm.config import BalloonConfig
from pyvmm.restore import carry_over, restore_vm
from pyvmm.vm_state import VmState
from pyvmm.snapshot.memory_file import data_ranges, write_full

MIB = 1 << 20


def test_discarded_pages_leave_the_host_and_the_guest_counts_on(accel, tmp_path):
    config = dataclasses.replace(counter_config(32 * MIB), balloon=BalloonConfig(amount_mib=8))
    vm = counting_vm(accel, config=config)
    try:
        memory = vm.memory
        region = memory.region_for(16 * MIB)
        memory.fill(16 * MIB, 8 * MIB, 0x5A)  # far from the guest's code and counter
        vm.pause()
        paused_at = memory.read_u64(COUNT)
        before = region.resident_bytes()
        assert memory.discard(16 * MIB, 8 * MIB) == 8 * MIB
        assert before - region.resident_bytes() >= 8 * MIB
        assert memory.read(16 * MIB, 8 * MIB) == bytes(8 * MIB)
        state = vm.save()
        assert state.devices["virtio-balloon"].device.target_pages == 8 << 8  # the transport holds the device's
        write_full(memory, str(tmp_path / "vm.mem"))  # the snapshot's memory file: one region at offset 0
        fd = os.open(tmp_path / "vm.mem", os.O_RDONLY)
        try:
            ranges = list(data_ranges(fd, 0, 32 * MIB))
        finally:
            os.close(fd)
        assert ranges and not [(start, end) for start, end in ranges if start < 24 * MIB and end > 16 * MIB]
        # the state, as another process reads it, continues in a new VM: the balloon with it
        state = VmState.from_dict(json.loads(json.dumps(state.to_dict())))
        carried = carry_over(vm)
    finally:
        vm.close()
    restored = restore_vm(state, carried.memory, lambda data: None, carryover=carried)
    try:
        assert restored.devices["virtio-balloon"].stats()["target_pages"] == 8 << 8
        assert restored.memory.read(16 * MIB, MIB) == bytes(MIB)
        finish(restored, paused_at)
    finally:
        restored.close()
