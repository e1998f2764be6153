"""A kick the saved VM took and had not served (queued for its I/O thread, or in an ioeventfd
not yet read) goes with that VM. A driver with EVENT_IDX kicks again only once the device has
caught up with avail_event, so a restored device that waited for the next kick would never
hear from the queue again (the Linux guest's vsock TX queue stalled so after a snapshot under
load). A restored VM serves every ready queue once when it resumes."""

import time

from helpers.virtio_driver import FakeDriver
from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.restore import carry_over, restore_vm


def test_a_request_whose_kick_was_lost_at_the_save_is_served_after_the_restore(tmp_path):
    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")  # cli; hlt
    vm = build_vm(MachineConfig(kernel=str(kernel), flat_address=0x100000, memory=16 << 20, rng="pci"),
                  lambda data: None, accel=choose_accelerator("tcg").create())
    try:
        driver = FakeDriver(vm.memory, vm.devices["virtio-rng"])
        queue = driver.queue(0)
        queue.add([], [64])          # published; its kick never reaches the device
        vm.start()
        vm.pause()
        state = vm.save()
        carried = carry_over(vm)
    finally:
        vm.close()
    assert queue.used_idx() == 0
    restored = restore_vm(state, carried.memory, lambda data: None, carryover=carried)
    try:
        time.sleep(0.2)
        assert queue.used_idx() == 0     # nothing is served while the restored VM is paused
        restored.resume()
        deadline = time.monotonic() + 10
        while queue.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        [(head, written)] = queue.take_used()
        assert written == 64 and len(set(queue.written(head))) > 1   # random bytes, not the zeros it was
    finally:
        restored.close()
