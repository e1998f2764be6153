"""ctypes mirrors of the KVM x86-64 userspace ABI (<linux/kvm.h>, <asm/kvm.h>).

Names follow the kernel's so that api.rst can be read side by side with this file.
Every struct's size is asserted at import time against the kernel ABI; the unit
tests additionally compile a C probe against the installed headers and compare
sizes, field offsets and ioctl numbers.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    Structure,
    Union,
    c_int32,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)

u8, u16, u32, u64, s32 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32

KVM_API_VERSION = 12

# Capabilities pyvmm relies on or probes (KVM_CHECK_EXTENSION arguments).
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_DEBUGREGS = 50
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_XSAVE2 = 208

# kvm_run.exit_reason values.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# kvm_vcpu_events.flags: which optional parts KVM_SET_VCPU_EVENTS should apply.
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

# kvm_clock_data.flags
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_PIT_SPEAKER_DUMMY = 1
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

# GSI routing (KVM_SET_GSI_ROUTING): entry types and irqchip ids.
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_MAX_IRQ_ROUTES = 4096  # x86; KVM_CHECK_EXTENSION(KVM_CAP_IRQ_ROUTING) reports the host's own

KVM_NR_INTERRUPTS = 256
KVM_MAX_CPUID_ENTRIES = 256


class kvm_regs(Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags",
    )]


class kvm_segment(Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
        ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
        ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_xsave(Structure):
    _fields_ = [("region", u32 * 1024)]


def kvm_xsave2(size: int) -> type[Structure]:
    """struct kvm_xsave of `size` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2); at least 4096)."""

    class _kvm_xsave2(Structure):
        _fields_ = [("region", u32 * (size // 4))]

    return _kvm_xsave2


class kvm_debugregs(Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_xcr(Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_userspace_memory_region(Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_cpuid_entry2(Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class kvm_cpuid2_header(Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


def kvm_cpuid2(nent: int) -> type[Structure]:
    """struct kvm_cpuid2 with room for `nent` entries (a flexible array in C)."""

    class _kvm_cpuid2(Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]

    return _kvm_cpuid2


class kvm_msr_entry(Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs_header(Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


def kvm_msrs(n: int) -> type[Structure]:
    """struct kvm_msrs with room for `n` entries."""

    class _kvm_msrs(Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    return _kvm_msrs


class kvm_msr_list_header(Structure):
    _fields_ = [("nmsrs", u32)]


def kvm_msr_list(n: int) -> type[Structure]:
    class _kvm_msr_list(Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    return _kvm_msr_list


class kvm_lapic_state(Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_pit_config(Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_irq_level(Structure):
    _fields_ = [("irq", u32), ("level", u32)]  # irq is a union with s32 status


class kvm_irqfd(Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


class kvm_ioeventfd(Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_irq_routing_irqchip(Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]  # devid: union with pad


class kvm_irq_routing_entry_u(Union):
    # The s390 adapter, Hyper-V SINT and Xen event-channel members are covered by pad (32 bytes).
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(Structure):
    _fields_ = [
        ("gsi", u32),
        ("type", u32),
        ("flags", u32),
        ("pad", u32),
        ("u", kvm_irq_routing_entry_u),
    ]


class kvm_irq_routing_header(Structure):
    _fields_ = [("nr", u32), ("flags", u32)]


def kvm_irq_routing(nr: int) -> type[Structure]:
    """struct kvm_irq_routing with room for `nr` entries (a flexible array in C)."""

    class _kvm_irq_routing(Structure):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * nr)]

    return _kvm_irq_routing


class kvm_msi(Structure):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class kvm_dirty_log(Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_translation(Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class kvm_mp_state(Structure):
    _fields_ = [("mp_state", u32)]


class _vcpu_events_exception(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _vcpu_events_interrupt(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _vcpu_events_nmi(Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _vcpu_events_smi(Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(Structure):
    _fields_ = [
        ("exception", _vcpu_events_exception),
        ("interrupt", _vcpu_events_interrupt),
        ("nmi", _vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _vcpu_events_smi),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_pit_channel_state(Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_pic_state(Structure):
    _fields_ = [(name, u8) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode",
        "init4", "elcr", "elcr_mask",
    )]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(Structure):
    # redirtbl entries as the 64-bit register the guest sees (the C union's `bits`)
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class kvm_irqchip_chip(Union):
    _fields_ = [("dummy", ctypes.c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", kvm_irqchip_chip)]


class kvm_clock_data(Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class kvm_enable_cap(Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# --- struct kvm_run: the page shared with the kernel for each vCPU -------------------


class kvm_run_io(Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_internal(Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_debug_arch(Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_run_msr(Structure):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class kvm_run_exit(Union):
    _fields_ = [
        ("hw_hardware_exit_reason", u64),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug_arch),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("msr", kvm_run_msr),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * 2048),
    ]


# The kernel ABI, x86-64. A mismatch here means a typo above, never a host difference.
ABI_SIZES = {
    kvm_regs: 144,
    kvm_segment: 24,
    kvm_dtable: 16,
    kvm_sregs: 312,
    kvm_fpu: 416,
    kvm_xsave: 4096,
    kvm_xcr: 16,
    kvm_debugregs: 128,
    kvm_pic_state: 16,
    kvm_ioapic_state: 216,
    kvm_irqchip_chip: 512,
    kvm_xcrs: 392,
    kvm_userspace_memory_region: 32,
    kvm_cpuid_entry2: 40,
    kvm_cpuid2_header: 8,
    kvm_msr_entry: 16,
    kvm_msrs_header: 8,
    kvm_msr_list_header: 4,
    kvm_lapic_state: 1024,
    kvm_pit_config: 64,
    kvm_irq_level: 8,
    kvm_irqfd: 32,
    kvm_ioeventfd: 64,
    kvm_irq_routing_irqchip: 8,
    kvm_irq_routing_msi: 16,
    kvm_irq_routing_entry_u: 32,
    kvm_irq_routing_entry: 48,
    kvm_irq_routing_header: 8,
    kvm_msi: 32,
    kvm_dirty_log: 16,
    kvm_translation: 24,
    kvm_mp_state: 4,
    kvm_vcpu_events: 64,
    kvm_pit_channel_state: 24,
    kvm_pit_state2: 112,
    kvm_irqchip: 520,
    kvm_clock_data: 48,
    kvm_enable_cap: 104,
    kvm_run_exit: 256,
    kvm_run: 2352,
}

for _struct, _size in ABI_SIZES.items():
    if ctypes.sizeof(_struct) != _size:  # pragma: no cover - guards edits to this file
        raise ImportError(f"{_struct.__name__}: ctypes size {ctypes.sizeof(_struct)} != kernel ABI {_size}")
if kvm_run.exit.offset != 32:  # pragma: no cover
    raise ImportError("kvm_run: exit union must start at offset 32")
