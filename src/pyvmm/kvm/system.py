"""Kvm: the /dev/kvm system fd (API version, capabilities, supported CPUID, MSR list)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import ioctls, uapi
from .errors import KvmError, KvmUnavailable
from .fd import KvmFd, ioctl

if TYPE_CHECKING:
    from .vm import VmFd

DEFAULT_DEVICE = "/dev/kvm"


def default_device() -> str:
    """/dev/kvm, unless PYVMM_KVM_DEVICE names another node (tests, containers)."""
    return os.environ.get("PYVMM_KVM_DEVICE", DEFAULT_DEVICE)


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf as KVM reports or accepts it."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class Kvm(KvmFd):
    """The KVM system fd. Raises KvmUnavailable with a one-line reason when KVM can't be used."""

    def __init__(self, path: str | None = None) -> None:
        path = path or default_device()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: this host offers no KVM (is the kvm module loaded?)") from None
        except PermissionError:
            raise KvmUnavailable(f"no permission to open {path}: run as root or join the 'kvm' group") from None
        except OSError as exc:
            raise KvmUnavailable(f"cannot open {path}: {exc.strerror}") from None
        super().__init__(fd)
        self.path = path
        try:
            self.api_version = ioctl(fd, ioctls.KVM_GET_API_VERSION)
        except KvmError as exc:
            self.close()
            raise KvmUnavailable(f"{path} is not a KVM device ({exc.strerror})") from None
        if self.api_version != uapi.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"{path} speaks KVM API {self.api_version}, pyvmm needs {uapi.KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, cap)

    def require(self, cap: int, name: str) -> None:
        if self.check_extension(cap) <= 0:
            raise KvmUnavailable(f"this host's KVM lacks {name}, which pyvmm needs")

    @property
    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, ioctls.KVM_GET_VCPU_MMAP_SIZE)

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(uapi.KVM_CAP_MAX_VCPUS) or self.check_extension(uapi.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[CpuidEntry]:
        nent = uapi.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = uapi.kvm_cpuid2(nent)()
            buf.nent = nent
            try:
                ioctl(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in buf.entries[: buf.nent]
            ]

    def msr_index_list(self) -> list[int]:
        header = uapi.kvm_msr_list_header(0)
        try:
            ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, header)
        except KvmError as exc:
            if exc.errno != errno.E2BIG:
                raise
        buf = uapi.kvm_msr_list(header.nmsrs)()
        buf.nmsrs = header.nmsrs
        ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> "VmFd":
        from .vm import VmFd

        vm_fd = ioctl(self.fd, ioctls.KVM_CREATE_VM, 0)
        return VmFd(vm_fd, self)


