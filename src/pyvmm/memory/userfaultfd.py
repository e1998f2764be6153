"""The host kernel's page-level memory interfaces: userfaultfd and /proc/self/pagemap.

Why here and not in pyvmm/kvm (the home of ioctls): these ioctls act on this process's own
mappings of guest RAM, not on /dev/kvm, and are needed whatever the accelerator is; the
software CPU uses them without KVM. This module is the one place that issues them (with
kvm/, net/tap.py and net/vhost.py: tests/unit/test_ioctls_only_in_kvm.py lists it).

- Dirty tracking (memory/dirty.py): userfaultfd write-protection in asynchronous mode
  (UFFD_FEATURE_WP_ASYNC, Linux 6.7): a write to a protected page is resolved by the kernel
  itself, which only clears the page's protection, so no handler thread runs (a Python
  handler would deadlock against a thread holding the GIL while it writes guest RAM).
  PAGEMAP_SCAN (Linux 6.7) then reports the pages written since they were protected
  (PAGE_IS_WRITTEN) and protects them again in the same walk (PM_SCAN_WP_MATCHING).
- Lazy restore (snapshot/): missing-page registration and UFFDIO_COPY.

Structs and numbers from include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import Structure, c_int64, c_uint64

from ..errors import PyvmmError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


def _ior(kind: int, nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (kind << 8) | nr


class uffdio_api(Structure):
    _fields_ = [("api", c_uint64), ("features", c_uint64), ("ioctls", c_uint64)]


class uffdio_range(Structure):
    _fields_ = [("start", c_uint64), ("len", c_uint64)]


class uffdio_register(Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64), ("ioctls", c_uint64)]


class uffdio_writeprotect(Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64)]


class uffdio_copy(Structure):
    _fields_ = [("dst", c_uint64), ("src", c_uint64), ("len", c_uint64), ("mode", c_uint64), ("copy", c_int64)]


class uffdio_zeropage(Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_uint64), ("zeropage", c_int64)]


class pm_scan_arg(Structure):
    _fields_ = [(name, c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class page_region(Structure):
    _fields_ = [("start", c_uint64), ("end", c_uint64), ("categories", c_uint64)]


for _struct, _size in ((uffdio_api, 24), (uffdio_range, 16), (uffdio_register, 32), (uffdio_writeprotect, 24),
                       (uffdio_copy, 40), (uffdio_zeropage, 32), (pm_scan_arg, 96), (page_region, 24)):
    assert ctypes.sizeof(_struct) == _size, _struct.__name__

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)
UFFDIO_UNREGISTER = _ior(0xAA, 0x01, 16)
UFFDIO_WAKE = _ior(0xAA, 0x02, 16)
UFFDIO_COPY = _iowr(0xAA, 0x03, 40)
UFFDIO_ZEROPAGE = _iowr(0xAA, 0x04, 32)
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, 24)
UFFDIO_API = _iowr(0xAA, 0x3F, 24)
USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0): /dev/userfaultfd hands out a userfaultfd

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

PAGEMAP_SCAN = _iowr(ord("f"), 16, 96)
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


class HostMemoryError(PyvmmError, OSError):
    """A userfaultfd or pagemap call the host kernel refused; str() names the call."""

    strerror: str

    def __init__(self, call: str, errno: int) -> None:
        super().__init__(errno, f"{call}: {os.strerror(errno)}")
        self.call = call

    def __str__(self) -> str:  # OSError's default prefixes "[Errno N]"
        return self.strerror or ""


def _ioctl(fd: int, request: int, arg: Structure | None, call: str) -> int:
    result = _libc.ioctl(fd, request, None if arg is None else ctypes.addressof(arg))
    if result < 0:
        raise HostMemoryError(call, ctypes.get_errno())
    return result


def open_userfaultfd(*, user_mode_only: bool = False) -> int:
    """A new userfaultfd (non-blocking, close-on-exec), not yet through UFFDIO_API.
    `user_mode_only`: faults taken in the kernel (a read(2) into the range) are not
    reported; enough for asynchronous write-protection, which reports nothing, and allowed
    without privilege where vm.unprivileged_userfaultfd is 0."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
    number = _SYS_USERFAULTFD.get(os.uname().machine)
    if number is not None:
        fd = _libc.syscall(number, flags)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != 1:  # EPERM: /dev/userfaultfd may still be open to us
            raise HostMemoryError("userfaultfd", err)
    try:
        device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HostMemoryError("open /dev/userfaultfd", exc.errno or 1) from None
    try:
        fd = _libc.ioctl(device, USERFAULTFD_IOC_NEW, flags)
        if fd < 0:
            raise HostMemoryError("USERFAULTFD_IOC_NEW", ctypes.get_errno())
        return fd
    finally:
        os.close(device)


def available_features(*, user_mode_only: bool = False) -> int:
    """The UFFD_FEATURE_* bits this kernel offers (asked on a throw-away userfaultfd: the
    handshake can be made only once per fd)."""
    fd = open_userfaultfd(user_mode_only=user_mode_only)
    try:
        api = uffdio_api(UFFD_API, 0, 0)
        _ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
        return api.features
    finally:
        os.close(fd)


def handshake(fd: int, features: int) -> int:
    """UFFDIO_API enabling `features`; returns the ioctls the fd then supports (a bit each)."""
    api = uffdio_api(UFFD_API, features, 0)
    _ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
    return api.ioctls


def register(fd: int, start: int, length: int, mode: int) -> int:
    """Register [start, start+length) of this process with `mode` (UFFDIO_REGISTER_MODE_*);
    returns the range ioctls allowed there (a bit each)."""
    arg = uffdio_register(uffdio_range(start, length), mode, 0)
    _ioctl(fd, UFFDIO_REGISTER, arg, "UFFDIO_REGISTER")
    return arg.ioctls


def unregister(fd: int, start: int, length: int) -> None:
    _ioctl(fd, UFFDIO_UNREGISTER, uffdio_range(start, length), "UFFDIO_UNREGISTER")


def write_protect(fd: int, start: int, length: int, protect: bool = True) -> None:
    """Set (or clear) write-protection on a registered range."""
    arg = uffdio_writeprotect(uffdio_range(start, length), UFFDIO_WRITEPROTECT_MODE_WP if protect else 0)
    _ioctl(fd, UFFDIO_WRITEPROTECT, arg, "UFFDIO_WRITEPROTECT")


def copy(fd: int, destination: int, source: int, length: int, mode: int = 0) -> int:
    """UFFDIO_COPY: fill missing pages at `destination` from `source` and wake the faulting
    threads (unless UFFDIO_COPY_MODE_DONTWAKE); returns the bytes copied."""
    arg = uffdio_copy(destination, source, length, mode, 0)
    _ioctl(fd, UFFDIO_COPY, arg, "UFFDIO_COPY")
    return arg.copy


def wake(fd: int, start: int, length: int) -> None:
    """UFFDIO_WAKE: wake the threads waiting on faults in the range (answered meanwhile)."""
    _ioctl(fd, UFFDIO_WAKE, uffdio_range(start, length), "UFFDIO_WAKE")


def zero_page(fd: int, start: int, length: int) -> int:
    """UFFDIO_ZEROPAGE: map zero pages over a missing range; returns the bytes mapped."""
    arg = uffdio_zeropage(uffdio_range(start, length), 0, 0)
    _ioctl(fd, UFFDIO_ZEROPAGE, arg, "UFFDIO_ZEROPAGE")
    return arg.zeropage


class PagemapScanner:
    """PAGEMAP_SCAN on this process's /proc/self/pagemap."""

    def __init__(self, capacity: int = 4096) -> None:
        try:
            self.fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise HostMemoryError("open /proc/self/pagemap", exc.errno or 1) from None
        self._regions = (page_region * capacity)()
        self._capacity = capacity

    def supported(self) -> bool:
        """Whether this kernel has PAGEMAP_SCAN (Linux 6.7): an empty scan succeeds."""
        arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg))
        try:
            _ioctl(self.fd, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
        except HostMemoryError:
            return False
        return True

    def take_written(self, start: int, end: int) -> list[tuple[int, int]]:
        """The runs [first, last) of pages in [start, end) written since they were last
        write-protected, protecting them again in the same walk (a write racing with the
        walk lands either in this answer or in the next one, never in neither)."""
        runs: list[tuple[int, int]] = []
        regions = self._regions
        while start < end:
            arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg), flags=PM_SCAN_WP_MATCHING, start=start, end=end,
                              vec=ctypes.addressof(regions), vec_len=self._capacity,
                              category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
            found = _ioctl(self.fd, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
            runs.extend((regions[i].start, regions[i].end) for i in range(found))
            if arg.walk_end <= start:
                break  # no progress: a kernel that stops early without saying why
            start = arg.walk_end
        return runs

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
