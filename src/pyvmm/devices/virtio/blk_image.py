"""The host side of a virtio-blk disk: opening and locking its image file, fallocate.

Kept apart from the request handling in blk.py; nothing here sees the guest.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import stat

from ...errors import PyvmmError

log = logging.getLogger(__name__)

VIRTIO_BLK_ID_BYTES = 20

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# The file system or device cannot do this fallocate mode: fall back, do not fail the request.
UNSUPPORTED_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV, errno.EINVAL}


class BlockError(PyvmmError, ValueError):
    """The disk image cannot be used as configured."""


def _load_fallocate():
    # os.posix_fallocate has no mode argument: hole punching needs libc's fallocate.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_libc_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc_fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_image(path: str, readonly: bool) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BlockError(f"disk image {path}: no such file") from None
    except OSError as exc:
        raise BlockError(f"disk image {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BlockError(f"disk image {path} is a directory")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BlockError(f"disk image {path} is neither a regular file nor a block device")
    try:
        return os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        if not readonly and (isinstance(exc, PermissionError) or exc.errno == errno.EROFS):
            raise BlockError(f"disk image {path} is not writable (attach it read-only)") from None
        raise BlockError(f"disk image {path}: {exc.strerror}") from None


def lock_image(fd: int, path: str, readonly: bool) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        how = "for writing" if readonly else "already"
        raise BlockError(f"disk image {path} is locked {how} by another VM") from None
    except OSError as exc:  # e.g. ENOLCK on some network file systems
        log.warning("disk image %s: cannot lock it (%s); nothing stops another VM writing it", path, exc.strerror)


def default_serial(st: os.stat_result) -> bytes:
    # Stable for one image file across runs, distinct between images (it names /dev/disk/by-id links).
    digest = hashlib.blake2b(f"{st.st_dev}:{st.st_ino}".encode(), digest_size=VIRTIO_BLK_ID_BYTES // 2)
    return digest.hexdigest().encode()
