"""Booting from a root disk (Firecracker's is_root_device): `pyvmm image rootfs` builds a Debian
root filesystem image; `--root-disk` makes it /dev/vda and root=/dev/vda. The default kernel
reaches it through pyvmm's initramfs (virtio drivers are modules), also when that kernel is
given explicitly without an initrd; the disk's init runs the command; what it writes stays."""

from __future__ import annotations

import re


def test_the_root_is_the_disk_and_a_file_written_persists(pyvmm, image, tmp_path):
    from pyvmm.images.rootfs import new_root_disk

    disk = new_root_disk(tmp_path / "root.ext4", progress=None)
    first = pyvmm("run", "--root-disk", str(disk), "--", "sh", "-c",
                  "grep ' / ' /proc/mounts; grep PRETTY_NAME /etc/os-release; ls /init 2>&1; "
                  "echo persisted-across-boots > /root/mark")
    assert first.returncode == 0, (first.stdout[-2000:], first.stderr)
    assert re.search(r"^/dev/vda / ext4 rw", first.stdout, re.M), first.stdout[-2000:]
    assert 'PRETTY_NAME="Debian GNU/Linux' in first.stdout
    assert "/init: No such file" in first.stdout   # not the initramfs any more

    # the default kernel named explicitly, no initrd: pyvmm supplies its initramfs
    second = pyvmm("run", "--kernel", str(image.kernel), "--append", "console=ttyS0 panic=-1 quiet",
                   "--root-disk", str(disk), "--", "sh", "-c", "cat /root/mark; grep ' / ' /proc/mounts")
    assert second.returncode == 0, (second.stdout[-2000:], second.stderr)
    assert "persisted-across-boots" in second.stdout
    assert re.search(r"^/dev/vda / ext4 rw", second.stdout, re.M)


def test_a_missing_root_device_is_reported_and_the_guest_stays_usable(pyvmm):
    result = pyvmm("run", "--append", "root=/dev/vdz", "--", "echo", "still-running")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr)
    assert "pyvmm: root device /dev/vdz did not appear; staying in the initramfs" in result.stdout
    assert "still-running" in result.stdout
