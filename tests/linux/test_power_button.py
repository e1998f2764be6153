"""The ACPI power button on the default guest: pressed from the host (the console's C-a p,
which calls Vm.press_power_button), the guest's button driver reports it and /init powers
off cleanly: outcome poweroff, exit status 0, while the guest's command was still running."""

from __future__ import annotations

import time

POWER_OFF_TIMEOUT = 60


def test_power_button_press_powers_the_default_guest_off(pyvmm):
    script = ("grep -l 'Power Button' /sys/class/input/input*/name >/dev/null && echo button-found; "
              "echo guest-ready; sleep 1000; echo slept-through")
    run = pyvmm.start("run", "--timeout", "600", "--", "sh", "-c", script, terminal=True)
    _, after = run.wait_for(b"guest-ready\r")  # the guest tty and the pty each add a CR
    run.send(b"\x01p")  # C-a p: press the ACPI power button
    pressed = time.monotonic()
    run.wait_for(b"pyvmm: power button pressed: powering off", after=after, timeout=POWER_OFF_TIMEOUT)
    result = run.finish(timeout=POWER_OFF_TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "button-found" in result.stdout
    assert "reboot: Power down" in result.stdout
    assert "slept-through" not in result.stdout and "pyvmm: exit status" not in result.stdout
    assert time.monotonic() - pressed < POWER_OFF_TIMEOUT


def test_power_button_on_an_idle_shell_powers_off_too(pyvmm):
    """No command: init's interactive shell waits on the console; the button still ends the VM."""
    run = pyvmm.start("run", "--timeout", "600", terminal=True)
    _, after = run.wait_for(b"busybox sh on the console")
    run.send(b"\x01p")
    result = run.finish(timeout=POWER_OFF_TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "pyvmm: power button pressed: powering off" in result.stdout
