"""`pyvmm` command-line errors that need no KVM: one line on stderr, exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest

NO_KVM = "/nonexistent/kvm"


def pyvmm(*args, timeout=120):
    env = dict(os.environ, PYVMM_KVM_DEVICE=NO_KVM)
    return subprocess.run(
        [sys.executable, "-m", "pyvmm.cli", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=timeout,
    )


def assert_one_line_error(result, *mentions):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyvmm: error:"), lines[0]
    if mentions:
        assert any(m in lines[0] for m in mentions), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, mention",
    [
        (["run", "--memory", "0"], "--memory"),
        (["run", "--memory", "1M"], "--memory"),
        (["run", "--memory", "3001k"], "--memory"),      # not a multiple of 4 KiB
        (["run", "--cpus", "0"], "--cpus"),
        (["run", "--memory", "banana"], "banana"),
        (["run", "--memory", "1.5G"], "1.5G"),
        (["run", "--timeout", "0"], "--timeout"),
    ],
)
def test_bad_config_is_one_line(args, mention):
    assert_one_line_error(pyvmm(*args), mention)


def test_unknown_cpu_feature_is_one_line_naming_the_feature():
    # A typo in --cpu-hide is bad input: it should be reported as such, not as a missing KVM device.
    line = assert_one_line_error(pyvmm("run", "--cpu-hide", "notafeature"))
    assert "notafeature" in line
    assert NO_KVM not in line


def test_missing_kernel_is_one_line():
    assert_one_line_error(pyvmm("run", "--kernel", "/nonexistent/file"), "/nonexistent/file", NO_KVM)


def test_missing_kvm_device_is_one_line_when_kvm_is_requested(tmp_path):
    # With valid arguments (a flat kernel: cli; hlt) the only thing to fail is opening the absent KVM device.
    # (--accel auto would run it on the software CPU instead.)
    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")
    assert_one_line_error(pyvmm("run", "--accel", "kvm", "--kernel", str(kernel), "--load-address", "0x100000"), NO_KVM)


def test_load_address_without_kernel_is_one_line():
    assert_one_line_error(pyvmm("run", "--load-address", "0x100000"), "--kernel")


def test_no_command_exits_2():
    result = pyvmm()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "usage:" in result.stdout + result.stderr


def test_missing_system_map_is_one_line(tmp_path):
    missing = tmp_path / "System.map"
    line = assert_one_line_error(pyvmm("run", "--system-map", str(missing)), str(missing))
    assert "No such file" in line


def test_a_system_map_that_is_not_one_is_one_line(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("these are not symbols\n")
    assert_one_line_error(pyvmm("run", "--system-map", str(junk)), "not a System.map or kallsyms line")


@pytest.mark.parametrize("args, start", [
    (["run", "--disk", "a.img,serial=" + "x" * 21], "pyvmm: error: --disk serial 'xxx"),
    (["run", "--disk", "a.img,cache=none"], "pyvmm: error: --disk: unknown option 'cache'"),
    (["run", "--net", "tap=t0,mac=01:00:00:00:00:01"], "pyvmm: error: --net mac '01:00:00:00:00:01'"),
    (["run", "--vsock", "cid=2,uds=/tmp/v"], "pyvmm: error: --vsock cid 2: guest CIDs start at 3"),
    (["run", "--console-port", "a=/tmp/s1", "--console-port", "a=/tmp/s2"], "pyvmm: error: --console-port 'a'"),
    (["run", "--console", "virtio,transport=isa"], "pyvmm: error: --console transport must be pci or mmio"),
    (["run", "--memory", "1.5G"], "pyvmm: error: --memory: invalid size '1.5G'"),
    (["run", "--cpu-hide", "notafeature"], "pyvmm: error: --cpu-hide: "),
])
def test_config_errors_name_the_flag(args, start):
    line = assert_one_line_error(pyvmm(*args))
    assert line.startswith(start), line


def test_a_disk_image_that_cannot_be_opened_is_one_line_naming_the_flag(tmp_path):
    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xfa\xf4")
    missing = tmp_path / "missing.img"
    line = assert_one_line_error(pyvmm("run", "--accel", "tcg", "--kernel", str(kernel), "--load-address", "0x100000",
                                       "--disk", str(missing)))
    assert line.startswith(f"pyvmm: error: --disk: disk image {missing}"), line
