"""The only layer that issues ioctls on /dev/kvm, VM and vCPU fds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .errors import KvmError, KvmUnavailable
    from .system import CpuidEntry, Kvm
    from .vcpu import VcpuFd
    from .vm import VmFd

# loaded at first use (lazy_exports.py): the CPU state's types need system.py's CpuidEntry, a
# VM on the software CPU none of the vCPU machinery
_SOURCES = {"KvmError": "errors", "KvmUnavailable": "errors", "CpuidEntry": "system", "Kvm": "system",
            "VcpuFd": "vcpu", "VmFd": "vm"}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)


def ioctl_request(name: str) -> int:
    """The request number of KVM ioctl `name` ("KVM_RUN"...): the seccomp allow-list filters
    ioctl(2) by it, naming KVM's ioctls without reaching into this package's machinery."""
    from . import ioctls

    return ioctls.ALL[name]


def ioctl_names() -> list[str]:
    """Every KVM ioctl pyvmm issues, by name."""
    from . import ioctls

    return sorted(ioctls.ALL)
