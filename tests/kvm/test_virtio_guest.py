"""The virtio device path on both CPU backends, driven by a tiny guest driver (guests/virtio_rng.S).

The guest finds the virtio-rng that `--rng mmio` puts at the first virtio-mmio slot,
negotiates VERSION_1, sets up queue 0, posts one 16-byte device-writable buffer, kicks and
polls the used ring, then prints what it got and debug-exits. The same guest runs on KVM
and on the software CPU; what differs is who serves the kick:

- KVM: QueueNotify is an ioeventfd (virtio_wiring._kick_through_eventfd); the write never
  leaves the kernel as an MMIO exit, and the I/O thread serves the queue;
- software CPU: the write reaches the transport on the vCPU thread, which hands the kick to
  the same I/O thread (a completion raised inside the guest's kick could starve other
  interrupts of its priority class).
"""

from __future__ import annotations

import pathlib
import re
import threading

from pyvmm.accel.select import choose_accelerator
from pyvmm.api.stats import collect
from pyvmm.arch.x86_64 import layout
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.devices.legacy.debug_exit import exit_status
from pyvmm.devices.virtio.mmio import QUEUE_NOTIFY, STATUS
from pyvmm.guests import build_source

GUESTS = pathlib.Path(__file__).parent / "guests"
USED_RING, BUFFER = 0x202000, 0x203000  # as in virtio_rng.S
SUCCESS = 0x10                          # + mode

LINE = re.compile(r"rng used_id=(\d+) used_len=(\d+) bytes=((?:0x[0-9a-f]{8} ){4})status=(0x[0-9a-f]{8})")


class RngRun:
    """Builds the VM, records who served the queue and what reached the transport, runs the guest."""

    def __init__(self, accel: str, mode: int) -> None:
        self.accel = accel
        self.console = bytearray()
        config = MachineConfig(kernel=str(build_source(GUESTS / "virtio_rng.S", 32)), cmdline=f"mode={mode}",
                          memory=16 << 20, rng="mmio")
        config.validate()
        self.vm = build_vm(config, self.console.extend, accel=choose_accelerator(accel).create())
        self.device = self.vm.devices["virtio-rng"]
        found = self.vm.mmio_bus.find(layout.VIRTIO_MMIO_BASE)
        assert found is not None and found.base == layout.VIRTIO_MMIO_BASE
        self.transport = found.device

        self.produced = bytearray()       # every byte the device's entropy source handed out
        self.served_on: list[str] = []    # thread of each process_queue() that completed requests
        self.failed_on: list[str] = []    # thread of each fail() (the ring broke)
        self.register_writes: list[tuple[int, int, str]] = []  # (offset, value, thread) at the transport

        source = self.device.source

        def recording_source(n: int) -> bytes:
            data = source(n)
            self.produced += data
            return data

        process_queue = self.device.process_queue

        def recording_process_queue(index: int) -> None:
            before = self.device.queues[index].completed
            process_queue(index)
            if self.device.queues[index].completed != before:
                self.served_on.append(threading.current_thread().name)

        fail = self.device.fail

        def recording_fail(reason: str) -> None:
            self.failed_on.append(threading.current_thread().name)
            fail(reason)

        write = self.transport.write

        def recording_write(offset: int, data: bytes) -> None:
            self.register_writes.append((offset, int.from_bytes(data, "little"), threading.current_thread().name))
            write(offset, data)

        # Instance attributes: the device looks process_queue up on self, the bus looks up write.
        self.device.source = recording_source
        self.device.process_queue = recording_process_queue
        self.device.fail = recording_fail
        self.transport.write = recording_write

    def run(self, timeout: float = 120):
        with self.vm:
            self.vm.start()
            outcome = self.vm.wait(timeout)
            self.rng_state = self.device.save()
            self.status = self.transport.status
            self.buffer = self.vm.memory.read(BUFFER, 16)
            self.used_idx = self.vm.memory.read_u16(USED_RING + 2)
            self.vcpu_threads = {t.name for t in self.vm._threads}
            self.accel_name = self.vm.accel.name
            self.stats = collect(self.vm, None)  # what GET /pyvmm/stats would show (test_stats.py)
        return outcome

    @property
    def text(self) -> str:
        return self.console.decode(errors="replace")

    def notify_writes(self) -> list[tuple[int, int, str]]:
        return [w for w in self.register_writes if w[0] == QUEUE_NOTIFY]


def check_request(run: RngRun, outcome, mode: int) -> None:
    """The guest got 16 device-written, non-zero bytes back, and they are the ones the device made."""
    assert run.accel_name == run.accel
    assert outcome is not None, f"the guest never exited; console: {run.text!r}"
    assert outcome.reason == "debug-exit", f"{outcome}; console: {run.text!r}"
    match = LINE.search(run.text)
    assert match, f"no report line on the console: {run.text!r} ({outcome})"
    used_id, used_len = int(match.group(1)), int(match.group(2))
    dwords = [int(word, 16) for word in match.group(3).split()]
    seen = b"".join(d.to_bytes(4, "little") for d in dwords)
    assert outcome.status == exit_status(SUCCESS + mode), f"{outcome}; console: {run.text!r}"
    assert (used_id, used_len) == (0, 16)
    assert seen == run.buffer == bytes(run.produced), "the guest read other bytes than the device wrote"
    assert any(seen)
    assert run.used_idx == 1
    assert int(match.group(4), 16) == 0x0F  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    assert run.rng_state.virtio.broken is None and run.device.bytes_served == 16


def check_kick_path(run: RngRun, kicks: int) -> None:
    """Who served the queue: the I/O thread on both; behind an ioeventfd on KVM, handed over by
    the transport on tcg."""
    if run.accel == "kvm":
        # The kernel swallowed every QueueNotify write (ioeventfd, datamatch 0): none of them
        # was an MMIO exit reaching the transport. The request was served on the I/O thread.
        assert run.notify_writes() == [], "QueueNotify reached the transport: no ioeventfd took it"
        assert run.served_on == [run.vm.iothread.name], f"queue served on {run.served_on}, not the I/O thread"
    else:
        assert [(value, thread in run.vcpu_threads) for _, value, thread in run.notify_writes()] == [(0, True)] * kicks
        assert run.served_on == [run.vm.iothread.name], f"queue served on {run.served_on}, not the I/O thread"
    # the rest of the register traffic did come through the transport, on the vCPU thread
    assert any(offset == STATUS for offset, _, _ in run.register_writes)
    assert {thread for _, _, thread in run.register_writes} <= run.vcpu_threads


def test_guest_driver_gets_entropy_through_virtio_mmio(accel):
    run = RngRun(accel, mode=0)
    outcome = run.run()
    check_request(run, outcome, mode=0)
    check_kick_path(run, kicks=1)
    assert run.failed_on == []
    assert "needs-reset" not in run.text


def test_broken_ring_needs_reset_then_recovers(accel):
    """An available index 100 ahead on a queue of 8: the device stops serving and raises
    DEVICE_NEEDS_RESET; the guest sees it, resets the device, and the next request works.
    The VMM itself keeps running and ends with the guest's own debug exit."""
    run = RngRun(accel, mode=1)
    outcome = run.run()
    needs_reset = re.search(r"needs-reset status=(0x[0-9a-f]{8})", run.text)
    assert needs_reset, f"{outcome}; console: {run.text!r}"
    assert int(needs_reset.group(1), 16) == 0x40 | 0x0F  # NEEDS_RESET on top of what the driver set
    check_request(run, outcome, mode=1)
    check_kick_path(run, kicks=2)
    assert run.text.index("needs-reset") < run.text.index("rng used_id=")
    # the broken kick was noticed where kicks are served: the I/O thread
    assert run.failed_on == [run.vm.iothread.name]

