"""The kernel-warning gate of this directory: it sees warning-level kernel lines, fails the
run that printed one, and every Linux boot here goes through it."""

from __future__ import annotations

import pathlib
import re

import pytest
from helpers.linux_guest import GuestRun


def test_a_warning_the_guest_kernel_prints_fails_the_run(image):
    # a KERN_WARNING line written to the kernel log: `quiet` would keep it off the console
    script = ("read level rest < /proc/sys/kernel/printk; echo console-loglevel=$level; "
              "echo '<5>pyvmm-test: a notice, below the gate' > /dev/kmsg; "
              "echo '<4>pyvmm-test: WARNING: CPU: 0 PID: 1 at pyvmm/test.c:1 gate_test+0x0/0x1' > /dev/kmsg")
    run = GuestRun(["run", "--", "sh", "-c", script])
    with pytest.raises(AssertionError) as failure:
        run.finish()
    message = str(failure.value)
    assert re.search(r"WARNING: \[ *[\d.]+\] pyvmm-test: WARNING: CPU: 0 PID: 1 at pyvmm/test.c:1", message), message
    console = run.text()
    assert "console-loglevel=5" in console and run.process.returncode == 0
    assert "pyvmm-test: WARNING" in console and "pyvmm-test: a notice" not in console


BOOTS_OUTSIDE_THE_FIXTURE = re.compile(r"pyvmm\.cli|build_vm\(|run_vm\(|Popen\(\[sys\.executable")


def test_every_linux_boot_here_goes_through_the_gated_fixture():
    for module in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        for number, line in enumerate(module.read_text().splitlines(), 1):
            assert not BOOTS_OUTSIDE_THE_FIXTURE.search(line), (
                f"{module.name}:{number} boots pyvmm without the kernel-warning gate; use the pyvmm fixture "
                f"(helpers/linux_guest.py): {line.strip()}")
