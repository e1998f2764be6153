"""Bad input ends with one line on stderr and exit status 2 — never a traceback."""

from __future__ import annotations

import struct

import pytest


def _assert_usage_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyvmm: error:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_kernel(pyvmm):
    _assert_usage_error(pyvmm("run", "--kernel", "/nonexistent/vmlinux"), "/nonexistent/vmlinux")


def test_not_an_elf_or_multiboot_image(pyvmm, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x7fELG" + bytes(200))
    _assert_usage_error(pyvmm("run", "--kernel", str(junk)), "not an ELF or Multiboot kernel")


def test_truncated_elf(pyvmm, guest, tmp_path):
    data = open(guest("hello64"), "rb").read()
    cut = tmp_path / "cut.elf"
    cut.write_bytes(data[:100])
    result = pyvmm("run", "--kernel", str(cut))
    _assert_usage_error(result, str(cut))


def test_image_larger_than_guest_ram(pyvmm, tmp_path):
    # an ELF64 whose only segment needs 8 MiB, booted with 4 MiB of RAM
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       2, 0x3E, 1, 0x100000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0x100000, 0x100000, 16, 8 << 20, 0x1000)
    image = tmp_path / "huge.elf"
    image.write_bytes(ehdr + phdr + bytes(0x1000 - 120) + b"\xf4" * 16)
    _assert_usage_error(pyvmm("run", "--kernel", str(image), "--memory", "4M"), "larger than guest RAM")


@pytest.mark.parametrize("memory", ["0", "1M", "lots"])
def test_bad_memory_size(pyvmm, memory):
    _assert_usage_error(pyvmm("run", "--memory", memory))


def test_no_kvm_device_refuses_an_explicit_kvm_request(pyvmm):
    _assert_usage_error(pyvmm("run", "--accel", "kvm", env={"PYVMM_KVM_DEVICE": "/nonexistent/kvm"}), "/nonexistent/kvm")


def test_a_device_node_that_is_not_kvm(pyvmm):
    _assert_usage_error(pyvmm("run", "--accel", "kvm", env={"PYVMM_KVM_DEVICE": "/dev/null"}), "not a KVM device")


@pytest.mark.parametrize("device", ["/nonexistent/kvm", "/dev/null"])
def test_without_kvm_auto_runs_on_the_software_cpu(pyvmm, device):
    result = pyvmm("run", "--demo", env={"PYVMM_KVM_DEVICE": device})
    assert result.returncode == 0, result.stderr
    assert "Hello from the pyvmm demo guest" in result.stdout
    assert result.stderr.startswith("pyvmm: accelerator tcg: no usable KVM") and device in result.stderr
