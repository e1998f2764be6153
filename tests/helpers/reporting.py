"""Tiny guests that report values on an I/O port: run one to its end and collect the reports."""

from __future__ import annotations

import pathlib

from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.guests import build_source

KVM_GUESTS = pathlib.Path(__file__).resolve().parent.parent / "kvm" / "guests"
REPORT_PORT = 0x510


class Reports:
    """A port that records every 32-bit value written to it."""

    def __init__(self) -> None:
        self.words: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.words.append(int.from_bytes(data, "little"))


def run_reporting(source: str, accel: str, words_per_report: int, **config):
    """Run tests/kvm/guests/`source` (64-bit) to its end on `accel`: (outcome, the reports as
    tuples of `words_per_report` values, vCPU 0)."""
    config = MachineConfig(kernel=str(build_source(KVM_GUESTS / source, 64)), memory=16 << 20, **config)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    reports = Reports()
    vm.pio_bus.register(REPORT_PORT, 4, reports, "report")
    try:
        outcome = vm.run(timeout=120)
        vcpu = vm.vcpus[0]
    finally:
        vm.close()
    words = reports.words
    return outcome, [tuple(words[i:i + words_per_report]) for i in range(0, len(words), words_per_report)], vcpu
