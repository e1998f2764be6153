"""The software CPU says when an interrupt it injected stays untaken for many slices in a row
(a guest spinning with IF=0, or a request the engine lost): one warning with the vCPU's
interrupt state, at each of a few counts."""

from __future__ import annotations

import logging
import time

from pyvmm.accel.tcg import vcpu as tcg_vcpu
from test_pause import _counting_vm  # (tests/kvm is on the path: pytest prepends it)

VECTOR = 0x30


def test_an_interrupt_a_guest_with_if_clear_never_takes_is_reported_once_per_count(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tcg_vcpu, "UNTAKEN_REPORTS", (20, 40))
    caplog.set_level(logging.WARNING, logger=tcg_vcpu.__name__)
    vm = _counting_vm(tmp_path, "tcg")  # counts in a loop with IF=0
    try:
        vm.pause()
        vcpu = vm.vcpus[0]
        assert vcpu.translator.native_interrupts is not None  # (pyvmm's pinned libunicorn has the patch)
        vcpu.inject_interrupt(VECTOR)
        vm.resume()
        deadline = time.monotonic() + 30
        while len(_reports(caplog)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        reports = _reports(caplog)
        assert [f"injected {n} slices ago" in r for r, n in zip(reports, (20, 40))] == [True, True], reports
        assert all("IF=0" in r and "request=True" in r and "rip=" in r for r in reports), reports
        time.sleep(0.3)
        assert len(_reports(caplog)) == 2  # not again until the next count
    finally:
        vm.close()


def _reports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"interrupt {VECTOR} injected" in r.getMessage()]
