"""`pyvmm clone`: a new VM from a defined one, like virt-clone.

Writable drives are copied next to the originals as NEW-DRIVEID.EXT, extent by extent:
holes stay holes (SEEK_DATA/SEEK_HOLE), and copy_file_range lets filesystems that can
(btrfs, XFS) share the blocks instead of copying them (a reflink). Read-only drives are
shared. Each NIC gets a new random MAC address, the vsock device a CID no other definition
uses and a socket path of its own. The source must not be running (its disks would be
copied mid-write); a paused VM is fine.
"""

from __future__ import annotations

import copy
import errno
import os
import random
from pathlib import Path

from ..errors import UserError
from . import definitions
from .records import RunDir, VmExists, check_name


def clone(host, source: str, new_name: str):
    """Define NEW_NAME as a copy of SOURCE on `host` (a client.Host); returns its handle."""
    check_name(new_name)
    if definitions.find(new_name, host.config_dir) is not None or RunDir.of(new_name, host.run_root).pid():
        raise VmExists(f"a VM named {new_name!r} exists already")
    original = definitions.load(source, host.config_dir)
    if host.vm(source).state() not in ("shut off", "crashed", "paused"):
        raise UserError(f"{source} is running: shut it down or suspend it before cloning its disks")
    document = copy.deepcopy(original.spec.to_document())
    copied: list[Path] = []
    try:
        for drive in document.get("drives", []):
            if drive.get("socket"):
                raise UserError(f"drive {drive['drive_id']!r} is a vhost-user back-end: pyvmm cannot copy it")
            if drive.get("is_read_only"):
                continue  # shared, like virt-clone's read-only disks
            source_path = Path(drive["path_on_host"])
            target = source_path.with_name(f"{new_name}-{drive['drive_id']}{source_path.suffix}")
            copy_sparse(source_path, target)
            copied.append(target)
            drive["path_on_host"] = str(target)
        for interface in document.get("network-interfaces", []):
            interface["guest_mac"] = random_mac()
        if "vsock" in document:
            document["vsock"]["guest_cid"] = free_cid(host)
            document["vsock"]["uds_path"] = str(Path(document["vsock"]["uds_path"]).with_name(f"{new_name}.vsock"))
        return host.define(document, new_name)
    except BaseException:
        for path in copied:
            path.unlink(missing_ok=True)
        raise


def random_mac() -> str:
    """A locally administered unicast address in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def free_cid(host) -> int:
    used = {2}
    for name in definitions.names(host.config_dir):
        try:
            vsock = definitions.load(name, host.config_dir).spec.vsock
        except UserError:
            continue
        if vsock is not None:
            used.add(vsock["guest_cid"])
    return max(used) + 1


def copy_sparse(source: Path, target: Path) -> None:
    """Copy `source` to the new file `target`, data extents only (holes stay holes)."""
    try:
        fin = open(source, "rb")
    except OSError as exc:
        raise UserError(f"{source}: {exc.strerror}") from None
    with fin:
        try:
            fout = open(target, "xb")
        except FileExistsError:
            raise VmExists(f"{target} exists already: pyvmm will not overwrite it") from None
        with fout:
            size = os.fstat(fin.fileno()).st_size
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # only a hole is left
                    raise
                hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                _copy_range(fin.fileno(), fout.fileno(), data, hole - data)
                offset = hole
            os.ftruncate(fout.fileno(), size)


def _copy_range(fd_in: int, fd_out: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        try:
            count = os.copy_file_range(fd_in, fd_out, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            count = 0
        if count == 0:  # no in-kernel copy here: read and write
            chunk = os.pread(fd_in, min(end - offset, 1 << 20), offset)
            if not chunk:
                return
            count = os.pwrite(fd_out, chunk, offset)
        offset += count
