"""Architectural vCPU state in one backend-neutral format.

Both CPU backends (KVM, the software CPU) convert to and from these objects, so
boot setup, snapshots and debugging tools are written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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
