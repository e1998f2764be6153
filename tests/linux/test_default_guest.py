"""The main job: boot the default Debian guest, run a command, report its exit status."""

from __future__ import annotations

import re
import time

import pytest


def _lines(result) -> list[str]:
    # guest output only: kernel messages start with a timestamp, pyvmm's init reports with "pyvmm:"
    return [line.strip() for line in result.stdout.splitlines()
            if line.strip() and not line.startswith("[") and not line.startswith("pyvmm:")]


def test_command_runs_with_the_configured_cpus_memory_and_cmdline(pyvmm, image):
    script = ("uname -r; grep -c ^processor /proc/cpuinfo; cat /proc/cmdline; "
              "grep MemTotal /proc/meminfo; "
              # the CMOS RTC: the kernel's clock set from it at boot, and /dev/rtc0 readable
              "echo guest-time $(date +%s); echo rtc-errors $(dmesg | grep -c 'Unable to read current time from RTC'); "
              "hwclock -r -u >/dev/null && echo hwclock-ok; "
              "echo meltdown: $(cat /sys/devices/system/cpu/vulnerabilities/meltdown); "
              "echo modules: $(cut -d' ' -f1 /proc/modules | sort); exit 3")
    host_before = time.time()
    result = pyvmm("run", "--cpus", "2", "--memory", "320M", "--append", "pyvmm.test=42", "--", "sh", "-c", script)
    host_after = time.time()
    assert result.returncode == 3, (result.stdout[-2000:], result.stderr)
    lines = _lines(result)
    assert image.kernel_version in lines
    assert lines[lines.index(image.kernel_version) + 1] == "2"
    assert any("pyvmm.test=42" in line for line in lines)
    total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", result.stdout).group(1))
    assert 250_000 < total_kib <= 320 * 1024  # the kernel keeps some for itself
    guest_time = int(re.search(r"^guest-time (\d+)$", result.stdout, re.M).group(1))
    assert host_before - 60 <= guest_time <= host_after + 60
    assert "rtc-errors 0" in lines and "hwclock-ok" in lines
    assert "pyvmm: exit status 3" in result.stdout
    # /init loads the drivers of the devices present: pvpanic and the power button (in the DSDT;
    # evdev to read the button), no virtio without a virtio device
    assert "modules: button evdev pvpanic pvpanic_mmio" in lines
    if "accelerator tcg" in result.stderr:
        # the software CPU reports an in-order model: Linux skips mitigations that protect nothing there
        assert "meltdown: Not affected" in lines


def test_poweroff_after_a_successful_command_exits_zero_with_all_output(pyvmm):
    # the last lines are still in the guest's serial buffer when the command ends: none may be lost
    script = "i=0; while [ $i -lt 300 ]; do echo line-$i; i=$((i+1)); done"
    result = pyvmm("run", "--", "sh", "-c", script)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr)
    assert [line for line in _lines(result) if line.startswith("line-")] == [f"line-{i}" for i in range(300)]
    assert "pyvmm: exit status 0" in result.stdout
    assert "reboot: Power down" in result.stdout


def test_guest_reboot_stops_the_vm_without_reboot(pyvmm):
    result = pyvmm("run", "--", "reboot", "-f")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr)
    assert result.stdout.count("reboot: Restarting system") == 1  # stopped, not restarted


@pytest.mark.kernel_warnings_expected("kernel panic", "call trace")
def test_kernel_panic_ends_with_a_non_zero_status(pyvmm):
    result = pyvmm("run", "--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert result.returncode == 4, (result.stdout[-2000:], result.stderr)
    assert "Kernel panic" in result.stdout
    assert "the guest kernel panicked" in result.stderr


def test_serial_output_reaches_the_host_whole_and_in_batches(pyvmm):
    """`seq` on ttyS0: the guest's driver hands the UART two loads per line; the host gets every
    line in order, in far fewer writes (host/console_output.py), the UART's count unchanged."""
    from pyvmm.config import MachineConfig

    guest = pyvmm.in_process(MachineConfig(), ["sh", "-c", "echo SEQ-START; seq 1 3000; echo SEQ-END"])
    outcome, console, (uart_bytes, batches) = guest.run_to_end(
        lambda vm: (vm.assembly.uart.stats.tx_bytes, vm.assembly.console_output.batches))
    assert outcome.status == 0, outcome.message
    lines = [line.strip() for line in console.splitlines()]
    start = lines.index("SEQ-START")
    assert lines[start + 1:start + 3002] == [str(i) for i in range(1, 3001)] + ["SEQ-END"]
    assert batches < 3000 / 10, batches                # 6000 loads before: a write each
    assert sum(len(chunk) for _, chunk in guest.chunks) == uart_bytes   # nothing lost or doubled
