"""KVM ioctl request numbers, encoded the way <asm-generic/ioctl.h> does."""

from __future__ import annotations

import ctypes

from . import uapi

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


# System ioctls (on the /dev/kvm fd).
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, uapi.kvm_msr_list_header)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, uapi.kvm_cpuid2_header)

# VM ioctls.
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, uapi.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, uapi.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, uapi.kvm_irq_level)
KVM_GET_IRQCHIP = _iowr(0x62, uapi.kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, uapi.kvm_irqchip)
KVM_IRQ_LINE_STATUS = _iowr(0x67, uapi.kvm_irq_level)
KVM_SET_GSI_ROUTING = _iow(0x6A, uapi.kvm_irq_routing_header)
KVM_IRQFD = _iow(0x76, uapi.kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, uapi.kvm_pit_config)
KVM_IOEVENTFD = _iow(0x79, uapi.kvm_ioeventfd)
KVM_SET_CLOCK = _iow(0x7B, uapi.kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, uapi.kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, uapi.kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, uapi.kvm_pit_state2)
KVM_ENABLE_CAP = _iow(0xA3, uapi.kvm_enable_cap)
KVM_SIGNAL_MSI = _iow(0xA5, uapi.kvm_msi)

# vCPU ioctls.
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, uapi.kvm_regs)
KVM_SET_REGS = _iow(0x82, uapi.kvm_regs)
KVM_GET_SREGS = _ior(0x83, uapi.kvm_sregs)
KVM_SET_SREGS = _iow(0x84, uapi.kvm_sregs)
KVM_TRANSLATE = _iowr(0x85, uapi.kvm_translation)
KVM_GET_MSRS = _iowr(0x88, uapi.kvm_msrs_header)
KVM_SET_MSRS = _iow(0x89, uapi.kvm_msrs_header)
KVM_GET_FPU = _ior(0x8C, uapi.kvm_fpu)
KVM_SET_FPU = _iow(0x8D, uapi.kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, uapi.kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, uapi.kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, uapi.kvm_cpuid2_header)
KVM_GET_CPUID2 = _iowr(0x91, uapi.kvm_cpuid2_header)
KVM_GET_MP_STATE = _ior(0x98, uapi.kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, uapi.kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, uapi.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, uapi.kvm_vcpu_events)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, uapi.kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, uapi.kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, uapi.kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, uapi.kvm_xcrs)
KVM_GET_DEBUGREGS = _ior(0xA1, uapi.kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, uapi.kvm_debugregs)
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_XSAVE2 = _ior(0xCF, uapi.kvm_xsave)
KVM_GET_STATS_FD = _io(0xCE)            # VM and vCPU: the binary stats fd (stats.py)

ALL = {name: value for name, value in globals().items() if name.startswith("KVM_") and isinstance(value, int)}
