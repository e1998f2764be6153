"""The one place that issues ioctl(2): through libc via ctypes, releasing the GIL.

ctypes (rather than fcntl.ioctl) so that EINTR reaches the caller: a vCPU is kicked
out of KVM_RUN by a signal, and fcntl.ioctl retries EINTR itself from Python 3.14.
"""

from __future__ import annotations

import ctypes
import os

from . import ioctls
from .errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int

_NAMES = {value: name for name, value in ioctls.ALL.items()}


def ioctl(fd: int, request: int, arg=None, *, name: str | None = None) -> int:
    """Issue `request` on `fd`. `arg` is a ctypes object (passed by reference), an int, or None."""
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    result = _libc.ioctl(fd, request, ptr)
    if result < 0:
        err = ctypes.get_errno()
        raise KvmError(name or _NAMES.get(request, hex(request)), err)
    return result


class KvmFd:
    """Owns one KVM file descriptor; closes it once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    fd = -1  # until __init__ succeeds, so close() and __del__ are always safe

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass
