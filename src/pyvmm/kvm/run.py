"""KvmRun: KVM_RUN and the exit reason it leaves in the kvm_run page, the one ioctl a running
vCPU issues for every exit. Compiled with the hot modules (pyvmm/compiled.py), so
that the accelerator's compiled loop (accel/kvm/io_exits.py) reaches it with a C call.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from typing import Any, Final

from ..compiled import c_module
from . import ioctls, uapi
from .errors import KvmError

_KVM_RUN: Final = ioctls.KVM_RUN
# A second libc handle, without argtypes (ctypes' argument conversion costs ~0.2 us on every
# exit) and without use_errno (ctypes' errno swap before and after the call costs ~0.25 us
# more): errno is read only when KVM_RUN failed (_last_errno).
_libc = ctypes.CDLL(None)


# native_run.c where the compiled group is built (KVM_RUN with no ctypes conversions on the
# way, and the hot loop), else None: libc's ioctl through ctypes, and the accelerator's own
# loop (accel/kvm/io_exits.py).
_native: Final[Any] = c_module("pyvmm.kvm.native_run")
NATIVE_IO_EXITS: Final = _native is not None
# Both leave errno for _last_errno; tests replace it to play KVM.
_run_ioctl = _native.ioctl if _native is not None else _libc.ioctl
_errno_location = _libc.__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)
RUN_INTERRUPTED: Final = -1  # KVM_RUN returned EINTR/EAGAIN: a kick, nothing happened in the guest
EXIT_REASONS_COUNTED: Final = 64  # exit_counts' length: KVM's reasons are below it (the rest share a slot)


def _last_errno() -> int:
    """This thread's errno, read right after a call failed: nothing between that call and this
    one can change it (the GIL hand-over around a ctypes call keeps errno, and no Python code,
    no allocation runs in between)."""
    value: int = _errno_location()[0]
    return value


class KvmRun:
    """Enters the guest of one vCPU fd and counts its exits by reason."""

    def __init__(self, fd: int, page: mmap.mmap) -> None:
        self.fd = fd
        self.struct: object = uapi.kvm_run.from_buffer(page)  # None once the page is let go
        self.exit_counts = [0] * EXIT_REASONS_COUNTED  # what `pyvmm top` and kvm_stat-style metrics read

    def enter(self) -> int:
        """Run the guest; returns the KVM exit reason (the details are in the page), or
        RUN_INTERRUPTED when a signal or `immediate_exit` ended KVM_RUN before any exit."""
        if _run_ioctl(self.fd, _KVM_RUN, 0) < 0:
            err = _last_errno()
            if err == errno.EINTR or err == errno.EAGAIN:
                return RUN_INTERRUPTED
            raise KvmError("KVM_RUN", err)
        reason: int = self.struct.exit_reason  # type: ignore[attr-defined]
        self.exit_counts[reason & (EXIT_REASONS_COUNTED - 1)] += 1
        return reason

    def serve_io_exits(self, page: mmap.mmap, pio: Any, mmio: Any) -> int:
        """Run the guest, serving its single port and MMIO accesses from the handler tables of
        `pio` and `mmio` (buses), until another exit: its reason (RUN_INTERRUPTED for a kick).
        native_run.c's loop: only where NATIVE_IO_EXITS."""
        try:
            reason: int = _native.serve_io_exits(_run_ioctl, self.fd, self.exit_counts, page, pio, mmio)
        except _native.RunFailed as failure:
            raise KvmError("KVM_RUN", failure.errno) from None
        return reason

    def release(self) -> None:
        """Drop the view of the page, so that its owner can unmap it."""
        self.struct = None
