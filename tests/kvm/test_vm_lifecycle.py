"""The VM lifecycle through the Python API: stop, kick, pause, failures, metrics."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import termios
import threading
import time

import pytest

from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.vm import EXIT_TIMEOUT, EXIT_VMM_ERROR

LOAD = 0x100000
COUNTER = 0x300000

# 32-bit protected-mode snippets (flat binaries entered at LOAD)
SPIN = bytes.fromhex("ebfe")                                   # jmp .
HALT = bytes.fromhex("fa" "f4" "ebfd")                         # cli; hlt; jmp back to hlt
COUNT = bytes.fromhex("ff0500003000" "ebf8")                   # incl COUNTER; jmp back
POKE_PORT_0x500 = bytes.fromhex("66ba0005" "b07a" "ee" "f4")   # mov $0x500,%dx; mov $0x7a,%al; out; hlt
# COM1 at 1.76 baud (divisor 0xffff: a load drains in about 90 s), "ok" to its transmitter,
# then 1 at COUNTER and halt, never touching the UART again
PRINT_SLOWLY = bytes.fromhex("66bafb03" "b080" "ee" "66baf803" "b0ff" "ee" "66baf903" "ee" "66bafb03" "b003" "ee"
                             "66baf803" "b06f" "ee" "b06b" "ee" "c60500003000" "01" "fa" "f4" "ebfd")


def _vm(tmp_path, code: bytes, accel: str, cpus: int = 1, console_write=lambda data: None):
    image = tmp_path / "guest.bin"
    image.write_bytes(code)
    config = MachineConfig(kernel=str(image), flat_address=LOAD, memory=16 << 20, cpus=cpus)
    return build_vm(config, console_write, accel=choose_accelerator(accel).create())


def _vcpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vcpu")]


@pytest.mark.parametrize("code", [SPIN, HALT], ids=["spinning", "halted"])
def test_timeout_kicks_the_vcpu_out_of_the_guest(tmp_path, accel, code):
    vm = _vm(tmp_path, code, accel)
    started = time.monotonic()
    outcome = vm.run(timeout=0.5)
    assert outcome.reason == "timeout" and outcome.status == EXIT_TIMEOUT
    assert time.monotonic() - started < 10  # joined promptly, not after some other event
    assert _vcpu_threads() == []


def test_stop_from_another_thread_ends_a_multi_vcpu_vm(tmp_path, accel):
    from pyvmm.vm import VmOutcome

    vm = _vm(tmp_path, SPIN, accel, cpus=2)  # vCPU 1 waits for SIPI inside KVM_RUN
    vm.start()
    threading.Timer(0.3, vm.request_stop, args=(VmOutcome("quit", 0, "test"),)).start()
    assert vm.wait(10).reason == "quit"
    vm.close()
    assert _vcpu_threads() == []


def test_a_failing_device_stops_the_vm_with_its_error(tmp_path, accel):
    vm = _vm(tmp_path, POKE_PORT_0x500, accel)

    class Broken:
        def read(self, offset, size):
            return b"\0" * size

        def write(self, offset, data):
            raise ValueError(f"cannot take {data.hex()}")

    vm.pio_bus.register(0x500, 1, Broken(), "broken")
    outcome = vm.run(timeout=20)
    assert outcome.reason == "vmm-error" and outcome.status == EXIT_VMM_ERROR
    assert "ValueError: cannot take 7a" in outcome.message
    assert _vcpu_threads() == []


def test_pause_holds_the_guest_and_resume_continues(tmp_path, accel):
    vm = _vm(tmp_path, COUNT, accel)
    vm.start()
    try:
        deadline = time.monotonic() + 20
        while vm.memory.read_u32(COUNTER) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.pause()
        time.sleep(0.1)  # let the kick land
        paused_at = vm.memory.read_u32(COUNTER)
        time.sleep(0.3)
        assert vm.memory.read_u32(COUNTER) == paused_at
        vm.resume()
        deadline = time.monotonic() + 20
        while vm.memory.read_u32(COUNTER) == paused_at and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.memory.read_u32(COUNTER) > paused_at
    finally:
        vm.close()


def test_a_paused_vm_has_written_what_its_guest_sent_to_the_serial_port(tmp_path, accel):
    """The UART's load would drain after ~90 s at this baud rate; pausing sends it (the drain
    timer waits with the VM)."""
    console = bytearray()
    vm = _vm(tmp_path, PRINT_SLOWLY, accel, console_write=console.extend)
    vm.start()
    try:
        deadline = time.monotonic() + 20
        while vm.memory.read_u32(COUNTER) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bytes(console) == b""  # (still in the transmitter)
        vm.pause()
        assert bytes(console) == b"ok"
        vm.resume()
    finally:
        vm.close()
    assert bytes(console) == b"ok"


def test_exit_counts_by_reason(tmp_path, guest):
    config = MachineConfig(kernel=guest("hello"), cmdline="exit=0", memory=16 << 20)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator("kvm").create())
    vm.start()
    vm.wait(20)
    counts = vm.exit_counts()
    vm.close()
    # every byte printed costs at least the LSR poll and the THR write
    assert counts.get("io", 0) > 2 * len("Hello from the pyvmm demo guest")
    assert vm.devices["com1"].stats.tx_bytes > len("Hello from the pyvmm demo guest")


def test_ctrl_a_x_quits_and_restores_the_terminal(guest):
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    process = subprocess.Popen([sys.executable, "-m", "pyvmm.cli", "run", "--accel", "kvm", "--kernel", guest("echo")],
                               stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    try:
        output = b""
        deadline = time.monotonic() + 30
        while b"echo: ready" not in output and time.monotonic() < deadline:
            output += os.read(master, 1024)
        assert b"echo: ready" in output
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # raw mode while running
        os.write(master, b"ab\x01x")
        assert process.wait(timeout=30) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
        os.close(slave)
    assert process.stderr.read() == b""
