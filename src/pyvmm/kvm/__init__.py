"""The only layer that issues ioctls on /dev/kvm, VM and vCPU fds."""

from .errors import KvmError, KvmUnavailable
from .system import CpuidEntry, Kvm
from .vcpu import VcpuFd
from .vm import VmFd

__all__ = ["CpuidEntry", "Kvm", "KvmError", "KvmUnavailable", "VcpuFd", "VmFd"]
