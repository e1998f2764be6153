"""The tiny guests through `pyvmm run`, checked by output and exit status."""

from __future__ import annotations

import os
import re


def test_demo_guest_ends_cleanly_and_auto_names_its_backend(pyvmm):
    result = pyvmm("run", "--demo")
    assert result.returncode == 0, result.stderr
    assert "Hello from the pyvmm demo guest" in result.stdout
    assert "memory: 262144 KiB" in result.stdout  # the 256M default
    # auto says which backend it picked, and why, in one line
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"pyvmm: accelerator (kvm|tcg): \S", lines[0]), result.stderr


def test_debug_exit_value_becomes_exit_status(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("hello"), "--append", "exit=3 console=ttyS0", "--memory", "64M")
    assert result.returncode == (3 << 1) | 1
    assert "cmdline: exit=3 console=ttyS0" in result.stdout
    assert "memory: 65536 KiB" in result.stdout


def test_console_log_receives_the_output(pyvmm, accel, guest, tmp_path):
    log = tmp_path / "console.log"
    result = pyvmm("run", "--accel", accel, "--kernel", guest("hello"), "--append", "exit=1", "--console-log", str(log))
    assert result.returncode == 3
    assert "Hello from the pyvmm demo guest" in log.read_text()
    assert "Hello" not in result.stdout


def test_guest_reads_console_input(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("echo"), input=b"hi there\nq")
    assert "echo: ready" in result.stdout
    assert "hi there" in result.stdout
    assert "echo: bye" in result.stdout
    assert result.returncode == (len(b"hi there\n") << 1) | 1


def test_64bit_elf_enters_in_long_mode(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("hello64"))
    assert "Hello from 64-bit long mode" in result.stdout
    assert result.returncode == (0x2A << 1) | 1


def test_two_vcpus_both_run(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("smp"), "--cpus", "2", "--append", "cpus=2")
    assert "smp: bsp apic 0" in result.stdout
    assert "smp: ap apic 1 up" in result.stdout
    assert "smp: 2 cpus up" in result.stdout
    assert result.returncode == (2 << 1) | 1


def test_three_vcpus_get_distinct_apic_ids(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("smp"), "--cpus", "3", "--append", "cpus=3")
    assert sorted(re.findall(r"ap apic (\d+) up", result.stdout)) == ["1", "2"]
    assert result.returncode == (3 << 1) | 1


def test_triple_fault_stops_with_a_clear_error(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("triple"))
    assert "triple: faulting" in result.stdout
    assert result.returncode == 4
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "triple fault" in lines[0] and "rip=0x" in lines[0]
    assert "Traceback" not in result.stderr


def test_reset_stops_the_vm_by_default(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("hello"))
    assert result.returncode == 0
    assert result.stdout.count("Hello from the pyvmm demo guest") == 1


def test_reboot_restarts_the_guest_after_a_reset(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("hello"), "--reboot", "--timeout", "3")
    assert result.stdout.count("Hello from the pyvmm demo guest") >= 2
    assert result.returncode == 124  # only the timeout ends a guest that keeps rebooting
    assert "--timeout" in result.stderr


def test_flat_binary_at_an_address(pyvmm, accel, tmp_path):
    # mov $0xf4,%dx; mov $0x21,%eax; out %eax,%dx  (32-bit protected mode)
    code = bytes.fromhex("66baf400" "b821000000" "ef" "f4")
    image = tmp_path / "flat.bin"
    image.write_bytes(code)
    result = pyvmm("run", "--accel", accel, "--kernel", str(image), "--load-address", "0x200000")
    assert result.returncode == (0x21 << 1) | 1, result.stderr


def test_multiboot_module_is_visible_to_the_guest(pyvmm, accel, guest, tmp_path):
    module = tmp_path / "payload.txt"
    module.write_text("module data")
    result = pyvmm("run", "--accel", accel, "--kernel", guest("hello"), "--module", f"{module} arg1", "--append", "exit=0")
    assert result.returncode == 1, result.stderr


def test_cpuid_policy_rejects_unknown_features(pyvmm, accel, guest):
    result = pyvmm("run", "--accel", accel, "--kernel", guest("hello"), "--cpu-hide", "xsave,warpdrive")
    assert result.returncode == 2
    assert "warpdrive" in result.stderr and "Traceback" not in result.stderr


def test_kvm_info_reports_capabilities_and_calibration(pyvmm):
    result = pyvmm("kvm-info")
    assert result.returncode == 0, result.stderr
    assert "KVM API 12" in result.stdout
    assert re.search(r"KVM_CAP_IRQCHIP\s+yes", result.stdout)
    match = re.search(r"kernel mode \(CPL0\): ([\d,.]+) M instructions/s; user mode \(CPL3\): ([\d,.]+) M", result.stdout)
    assert match and float(match.group(1).replace(",", "")) > 0 and float(match.group(2).replace(",", "")) > 0
    assert "verdict" in result.stdout
    compiled = "NO (PYVMM_COMPILED=0)" if os.environ.get("PYVMM_COMPILED") == "0" else "yes (mypyc)"
    assert re.search(rf"^compiled +{re.escape(compiled)}: the hot modules", result.stdout, re.M)
    assert re.search(r"^paravirtual .*\bkvmclock\b", result.stdout, re.M)   # every KVM has kvm-clock
