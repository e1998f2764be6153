"""A corrupt kernel or an initrd that does not fit: one line, exit status 2, before any boot."""

from __future__ import annotations


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout[-500:], result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_truncated_bzimage(pyvmm, image, tmp_path):
    cut = tmp_path / "vmlinuz-cut"
    cut.write_bytes(image.kernel.read_bytes()[: 3 << 20])
    _assert_one_line_error(pyvmm("run", "--kernel", str(cut), "--initrd", str(image.initramfs)), str(cut))


def test_corrupt_payload(pyvmm, image, tmp_path):
    data = bytearray(image.kernel.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)
    bad = tmp_path / "vmlinuz-bad"
    bad.write_bytes(bytes(data))
    _assert_one_line_error(pyvmm("run", "--kernel", str(bad), "--initrd", str(image.initramfs)), str(bad))


def test_initrd_too_large_for_guest_memory(pyvmm, image, tmp_path):
    big = tmp_path / "initrd-big"
    big.write_bytes(bytes(200 << 20))
    _assert_one_line_error(pyvmm("run", "--kernel", str(image.kernel), "--initrd", str(big), "--memory", "128M"))
