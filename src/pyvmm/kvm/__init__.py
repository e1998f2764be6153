"""The only layer that issues ioctls on /dev/kvm, VM and vCPU fds."""

from .errors import KvmError, KvmUnavailable
from .system import CpuidEntry, Kvm
from .vcpu import VcpuFd
from .vm import VmFd

__all__ = ["CpuidEntry", "Kvm", "KvmError", "KvmUnavailable", "VcpuFd", "VmFd"]


def ioctl_request(name: str) -> int:
    """The request number of KVM ioctl `name` ("KVM_RUN"...): the seccomp allow-list filters
    ioctl(2) by it, naming KVM's ioctls without reaching into this package's machinery."""
    from . import ioctls

    return ioctls.ALL[name]


def ioctl_names() -> list[str]:
    """Every KVM ioctl pyvmm issues, by name."""
    from . import ioctls

    return sorted(ioctls.ALL)
