"""Architectural vCPU state in one backend-neutral format.

Both CPU backends (KVM, the software CPU) convert to and from these objects, so
boot setup, snapshots and debugging tools are written once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import ClassVar

from ...kvm.system import CpuidEntry
from ...persist import State

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

# Control-register and EFER bits used by the entry states.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IF = 1 << 9


@dataclass
class Segment:
    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the architectural name of the long-mode bit
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor for this segment (bases and limits above 32 bits ignored)."""
        limit = self.limit >> 12 if self.g else self.limit
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = self.avl | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return (
            (limit & 0xFFFF)
            | ((self.base & 0xFFFFFF) << 16)
            | (access << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (flags << 52)
            | (((self.base >> 24) & 0xFF) << 56)
        )


@dataclass
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


@dataclass
class CpuState:
    """Everything a backend needs to start or resume one x86-64 vCPU."""

    gprs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GPR_NAMES, 0))
    rip: int = 0xFFF0
    rflags: int = RFLAGS_RESERVED
    segments: dict[str, Segment] = field(default_factory=dict)
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int | None = None  # None: keep the backend's (KVM marks vCPU 0 as the BSP)
    msrs: dict[int, int] = field(default_factory=dict)
    fpu_control: int = 0x37F
    mxcsr: int = 0x1F80

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "segments":
                value = {k: vars(v).copy() for k, v in value.items()}
            elif isinstance(value, DescriptorTable):
                value = vars(value).copy()
            elif isinstance(value, dict):
                value = {str(k): v for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CpuState":
        state = cls(**{k: v for k, v in data.items() if k not in ("segments", "gdt", "idt", "msrs")})
        state.segments = {k: Segment(**v) for k, v in data.get("segments", {}).items()}
        state.gdt = DescriptorTable(**data["gdt"])
        state.idt = DescriptorTable(**data["idt"])
        state.msrs = {int(k): v for k, v in data.get("msrs", {}).items()}
        return state


# --- the saved state: complete, typed and versioned (Persist), the same on both backends -------

U64 = (1 << 64) - 1
FXSAVE_SIZE = 512
XSAVE_HEADER_SIZE = 64
XSTATE_X87, XSTATE_SSE = 1 << 0, 1 << 1
# kvm_vcpu_events.interrupt.shadow bits (the architectural "blocking by" flags)
SHADOW_MOV_SS, SHADOW_STI = 1 << 0, 1 << 1
MP_STATES = ("runnable", "uninitialized", "init-received", "halted", "sipi-received")
LAPIC_PAGE_SIZE = 1024


@dataclass(frozen=True)
class SegmentState(State):
    """A segment register with its hidden part (what the CPU loaded from the descriptor)."""

    KIND: ClassVar[str] = "x86-segment"
    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name of the long-mode bit
    g: int
    avl: int
    unusable: int

    def validate(self) -> None:
        self.check_range("selector", 0, 0xFFFF)
        self.check_range("base", 0, U64)
        self.check_range("limit", 0, 0xFFFFFFFF)
        self.check_range("type", 0, 15)
        self.check_range("dpl", 0, 3)
        for bit in ("present", "db", "s", "l", "g", "avl", "unusable"):
            self.check_range(bit, 0, 1)

    @classmethod
    def of(cls, segment: Segment) -> "SegmentState":
        return cls(**vars(segment))

    def as_segment(self) -> Segment:
        return Segment(**{f.name: getattr(self, f.name) for f in fields(Segment)})


@dataclass(frozen=True)
class TableState(State):
    """GDTR or IDTR."""

    KIND: ClassVar[str] = "x86-descriptor-table"
    base: int
    limit: int

    def validate(self) -> None:
        self.check_range("base", 0, U64)
        self.check_range("limit", 0, 0xFFFF)


@dataclass(frozen=True)
class FpuState(State):
    """x87 and SSE state, as FXSAVE lays it out (the legacy region of an XSAVE area)."""

    KIND: ClassVar[str] = "x86-fpu"
    fcw: int
    fsw: int
    ftw: int  # the abridged tag word: one bit per register, 1 = valid
    fop: int
    fip: int
    fdp: int
    mxcsr: int
    st: tuple[bytes, ...]   # ST0..ST7 (MM0..MM7), 10 bytes each
    xmm: tuple[bytes, ...]  # XMM0..XMM15, 16 bytes each

    def validate(self) -> None:
        for name in ("fcw", "fsw", "fop"):
            self.check_range(name, 0, 0xFFFF)
        self.check_range("ftw", 0, 0xFF)
        self.check_range("fip", 0, U64)
        self.check_range("fdp", 0, U64)
        self.check_range("mxcsr", 0, 0xFFFFFFFF)
        if len(self.st) != 8 or any(len(r) != 10 for r in self.st):
            self.fail("st", "expected 8 registers of 10 bytes")
        if len(self.xmm) != 16 or any(len(r) != 16 for r in self.xmm):
            self.fail("xmm", "expected 16 registers of 16 bytes")

    @classmethod
    def reset(cls) -> "FpuState":
        return cls(fcw=0x37F, fsw=0, ftw=0, fop=0, fip=0, fdp=0, mxcsr=0x1F80,
                   st=(bytes(10),) * 8, xmm=(bytes(16),) * 16)

    @classmethod
    def from_fxsave(cls, area: bytes) -> "FpuState":
        fcw, fsw, ftw, fop, fip, fdp, mxcsr = struct.unpack_from("<HHBxHQQI", area, 0)
        return cls(fcw=fcw, fsw=fsw, ftw=ftw, fop=fop, fip=fip, fdp=fdp, mxcsr=mxcsr,
                   st=tuple(bytes(area[32 + 16 * i:42 + 16 * i]) for i in range(8)),
                   xmm=tuple(bytes(area[160 + 16 * i:176 + 16 * i]) for i in range(16)))

    def fxsave(self, mxcsr_mask: int = 0xFFFF) -> bytes:
        area = bytearray(FXSAVE_SIZE)
        struct.pack_into("<HHBxHQQII", area, 0, self.fcw, self.fsw, self.ftw, self.fop, self.fip, self.fdp,
                         self.mxcsr, mxcsr_mask)
        for i, reg in enumerate(self.st):
            area[32 + 16 * i:42 + 16 * i] = reg
        for i, reg in enumerate(self.xmm):
            area[160 + 16 * i:176 + 16 * i] = reg
        return bytes(area)


@dataclass(frozen=True)
class XsaveState(State):
    """XCR0 and the XSAVE components beyond x87/SSE (those are in FpuState), each in the
    standard (uncompacted) format: component number -> its bytes."""

    KIND: ClassVar[str] = "x86-xsave"
    xcr0: int
    xstate_bv: int  # the components not in their initial state when saved
    components: dict[int, bytes]

    def validate(self) -> None:
        self.check_range("xcr0", 0, U64)
        self.check_range("xstate_bv", 0, U64)
        if not self.xcr0 & XSTATE_X87:
            self.fail("xcr0", "bit 0 (x87) must be set")
        # x87 and SSE state exist whatever XCR0 says (FXSAVE's region); the rest only if enabled
        if self.xstate_bv & ~self.xcr0 & ~(XSTATE_X87 | XSTATE_SSE):
            self.fail("xstate_bv", f"{self.xstate_bv:#x} holds components XCR0 {self.xcr0:#x} does not enable")
        for number in self.components:
            if not 2 <= number < 64 or not self.xstate_bv >> number & 1:
                self.fail("components", f"component {number} is not one in use (2..63, set in xstate_bv)")


@dataclass(frozen=True)
class EventsState(State):
    """Events the vCPU holds between two instructions (KVM's kvm_vcpu_events, in its terms)."""

    KIND: ClassVar[str] = "x86-events"
    exception_injected: bool     # being delivered (re-delivered on entry)
    exception_pending: bool      # raised, not yet delivered
    exception_vector: int
    exception_error_code: int | None
    exception_payload: int | None  # CR2 of a #PF, DR6 of a #DB, before delivery writes it
    interrupt_injected: bool
    interrupt_vector: int
    interrupt_soft: bool
    interrupt_shadow: int        # SHADOW_MOV_SS | SHADOW_STI: no interrupt before the next instruction
    nmi_injected: bool
    nmi_pending: bool
    nmi_masked: bool
    sipi_vector: int
    smm: bool
    smi_pending: bool
    latched_init: bool
    triple_fault_pending: bool

    def validate(self) -> None:
        for name in ("exception_vector", "interrupt_vector", "sipi_vector"):
            self.check_range(name, 0, 255)
        self.check_range("interrupt_shadow", 0, SHADOW_MOV_SS | SHADOW_STI)
        if self.exception_error_code is not None:
            self.check_range("exception_error_code", 0, 0xFFFFFFFF)
        if self.exception_payload is not None:
            self.check_range("exception_payload", 0, U64)

    @classmethod
    def none(cls) -> "EventsState":
        return cls(exception_injected=False, exception_pending=False, exception_vector=0, exception_error_code=None,
                   exception_payload=None, interrupt_injected=False, interrupt_vector=0, interrupt_soft=False,
                   interrupt_shadow=0, nmi_injected=False, nmi_pending=False, nmi_masked=False, sipi_vector=0,
                   smm=False, smi_pending=False, latched_init=False, triple_fault_pending=False)


@dataclass(frozen=True)
class VcpuState(State):
    """One x86-64 vCPU, complete: what a fresh vCPU needs to continue where this one stopped.

    MSRs hold what the backend has of msrs.SAVED_MSRS (EFER, APIC base, FS/GS base are the
    fields above; IA32_TSC is the guest's TSC when saved: restored, the guest's TSC continues
    from it, so the time the VM spent saved is not seen). `lapic` is the xAPIC register page
    where the LAPIC belongs to the vCPU (KVM's in-kernel LAPIC); None where the platform
    saves it (the software CPU)."""

    KIND: ClassVar[str] = "x86-vcpu"
    gprs: dict[str, int]
    rip: int
    rflags: int
    segments: dict[str, SegmentState]
    gdt: TableState
    idt: TableState
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    dr: tuple[int, int, int, int]
    dr6: int
    dr7: int
    fpu: FpuState
    xsave: XsaveState | None  # None: no XSAVE (the backend, or the CPUID it gives, lacks it)
    msrs: dict[int, int]
    events: EventsState
    mp_state: str
    lapic: bytes | None

    def validate(self) -> None:
        if set(self.gprs) != set(GPR_NAMES):
            self.fail("gprs", f"expected exactly {', '.join(GPR_NAMES)}")
        for name, value in self.gprs.items():
            if not 0 <= value <= U64:
                self.fail(f"gprs[{name}]", f"{value} is outside 0..{U64}")
        if set(self.segments) != set(SEGMENT_NAMES):
            self.fail("segments", f"expected exactly {', '.join(SEGMENT_NAMES)}")
        for name in ("rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer", "apic_base", "dr6", "dr7"):
            self.check_range(name, 0, U64)
        self.check_range("cr8", 0, 15)
        for i, value in enumerate(self.dr):
            if not 0 <= value <= U64:
                self.fail(f"dr[{i}]", f"{value} is outside 0..{U64}")
        for index, value in self.msrs.items():
            if not 0 <= index <= 0xFFFFFFFF or not 0 <= value <= U64:
                self.fail(f"msrs[{index:#x}]", "index or value out of range")
        if self.mp_state not in MP_STATES:
            self.fail("mp_state", f"{self.mp_state!r} is not one of {', '.join(MP_STATES)}")
        if self.lapic is not None and len(self.lapic) != LAPIC_PAGE_SIZE:
            self.fail("lapic", f"expected {LAPIC_PAGE_SIZE} bytes, got {len(self.lapic)}")


# --- what the guest was shown of the CPU: kept when a state moves to another accelerator ------

@dataclass(frozen=True)
class CpuidLeafState(State):
    """One CPUID answer: leaf (function), subleaf (index), KVM's flags, the four registers."""

    KIND: ClassVar[str] = "x86-cpuid-leaf"
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def validate(self) -> None:
        for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
            self.check_range(name, 0, 0xFFFFFFFF)


@dataclass(frozen=True)
class GuestCpuView(State):
    """What the guest could have learnt about its CPU and timers and calibrated against: vCPU
    0's CPUID (the others differ only in APIC IDs), the TSC rate and the LAPIC timer's input
    clock. A restore on another accelerator must keep all of it (accel/cross.py)."""

    KIND: ClassVar[str] = "x86-guest-cpu-view"
    cpuid: tuple[CpuidLeafState, ...]
    tsc_khz: int
    lapic_timer_hz: int

    def validate(self) -> None:
        self.check_range("tsc_khz", 1, 0xFFFFFFFF)
        self.check_range("lapic_timer_hz", 1, 1 << 40)

    @classmethod
    def of(cls, entries: list[CpuidEntry], tsc_khz: int, lapic_timer_hz: int) -> "GuestCpuView":
        return cls(cpuid=tuple(CpuidLeafState(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                               for e in entries), tsc_khz=tsc_khz, lapic_timer_hz=lapic_timer_hz)

    def entries(self) -> list[CpuidEntry]:
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in self.cpuid]
