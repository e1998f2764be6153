"""What a jailed VM's process sees: the paths its private root holds, and its device nodes.

Paths keep their host names inside the jail (a definition's paths stay valid), each bind-
mounted read-only or read-write: the Python interpreter, its standard library and pyvmm's venv
and sources (read-only: the VMM is Python), the shared libraries, the VM's run directory, its
kernel, initrd, disk images, vsock socket directory, snapshot files, and pyvmm's caches that
the default guest boots from (read-only). Nothing else of the host's file system.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

# Character devices (major, minor), created in the jail's /dev (mknod; the host's nodes
# are not bind-mounted, so their owner and mode on the host do not matter).
DEVICES = {"null": (1, 3), "zero": (1, 5), "urandom": (1, 9), "random": (1, 8), "kvm": (10, 232),
           "net/tun": (10, 200), "userfaultfd": (10, 257)}
OWNED_DEVICES = ("kvm", "net/tun", "userfaultfd")   # chowned to the VM's uid (root:kvm 0660 on hosts)


@dataclass
class Exposure:
    paths: dict[str, bool] = field(default_factory=dict)   # host path -> writable
    devices: list[str] = field(default_factory=list)      # names under /dev
    owned: list[str] = field(default_factory=list)        # host files the VM's uid must own while jailed

    def add(self, path: str | os.PathLike, writable: bool = False) -> None:
        path = os.path.abspath(path)
        if not os.path.lexists(path):
            raise UserError(f"jail: {path} does not exist")
        self.paths[path] = self.paths.get(path, False) or writable


class JailRefused(UserError):
    """A machine the jail cannot hold."""


def _python(exposure: Exposure) -> None:
    import pyvmm

    for prefix in {sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))}:
        exposure.add(prefix)
    exposure.add(Path(pyvmm.__file__).resolve().parents[1])    # pyvmm's sources (an editable install's src/)
    for library in ("/usr/lib", "/usr/lib64", "/etc/ld.so.cache"):
        if os.path.exists(library) and not os.path.islink(library):
            exposure.add(library)


def _default_guest(exposure: Exposure) -> None:
    """The default guest boots from pyvmm's caches: build or extract them now, outside the jail,
    where they can be written."""
    from ..images import default_image
    from ..loader.linux.extract import extract_vmlinux
    from ..user_cache import user_cache

    image = default_image()
    extract_vmlinux(image.kernel)
    exposure.add(Path(image.kernel).parent)
    for cached in ("vmlinux", "tcg", "host-calibration.json", "guests"):
        if user_cache(cached).exists():
            exposure.add(user_cache(cached))


def plan(document: dict[str, Any], run_dir: Path, restore: dict[str, Any] | None, *, netns: bool) -> Exposure:
    """The exposure of the VM `document` describes (a checked definition)."""
    exposure = Exposure()
    _python(exposure)
    exposure.add(run_dir, writable=True)
    boot = document.get("boot-source")
    if boot:
        for key in ("kernel_image_path", "initrd_path"):
            if boot.get(key):
                exposure.add(boot[key])
    elif restore is None:
        _default_guest(exposure)
    for drive in document.get("drives") or []:
        if drive.get("socket"):
            exposure.add(drive["socket"], writable=True)
        else:
            writable = not drive.get("is_read_only", False)
            exposure.add(drive["path_on_host"], writable=writable)
            exposure.owned.append(os.path.abspath(drive["path_on_host"]))
    # tap=auto NICs get TAPs the jailer makes and hands in (net/handed.py); named TAPs are opened inside
    named_taps = [net for net in document.get("network-interfaces") or [] if net.get("host_dev_name") != "auto"]
    if named_taps and netns:
        raise JailRefused("jail: netns = true leaves the host's TAP devices outside the jail: a VM with a NIC "
                          "on a named TAP needs netns = false (or host_dev_name = \"auto\")")
    vsock = document.get("vsock")
    if vsock:
        directory = os.path.dirname(os.path.abspath(vsock["uds_path"]))
        mode = os.stat(directory).st_mode
        if mode & stat.S_ISVTX or mode & stat.S_IWOTH:
            raise JailRefused(f"jail: vsock.uds_path: {directory} is shared (sticky or world-writable): give the VM's "
                              f"socket a directory of its own, which the jail hands to the VM's uid")
        exposure.add(directory, writable=True)
        exposure.owned.append(directory)
    if restore is not None:
        exposure.add(restore["snapshot_path"])
        backend = (restore.get("mem_backend") or {}).get("backend_path") or restore.get("mem_file_path")
        if backend:
            exposure.add(backend, writable=True)
    exposure.devices = ["null", "zero", "urandom", "random"]
    if os.path.exists("/dev/kvm"):
        exposure.devices.append("kvm")
    if os.path.exists("/dev/userfaultfd"):
        exposure.devices.append("userfaultfd")
    if named_taps:
        exposure.devices.append("net/tun")
    for path in list(exposure.owned):
        if not (os.path.isfile(path) or os.path.isdir(path)) or stat.S_ISLNK(os.lstat(path).st_mode):
            exposure.owned.remove(path)
    return exposure
