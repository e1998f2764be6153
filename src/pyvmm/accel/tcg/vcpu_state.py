"""The software CPU's vCPU state to and from the backend-neutral VcpuState (KVM's format); the
registers a boot entry (CpuState) or a startup IPI loads.

CR8 is the platform LAPIC's TPR (Unicorn's own CR8 goes to a stub APIC). Unicorn's register
API gives general, control (CR0-CR4), debug, x87 (physical registers FP0-7 as
mantissa/exponent), SSE, descriptor-table, TR/LDTR and MSR values; segment registers'
hidden parts come from the translator's segment cache (private_state.py). The translator's
private flags (CPL, code and stack size, ADDSEG, the STI/MOV SS interrupt shadow) follow
from the architectural state, so a restore recomputes them; between two slices no
exception is in flight (its error code and double-fault tracking are reset before every
slice), so they are not part of the state.

What the software CPU cannot hold is refused with one StateError line before anything is
written: an XSAVE state beyond x87/SSE, KVM's paravirtual MSRs, an event KVM had not yet
delivered, NMI blocking, SMM. The guest's TSC is the host's plus an offset per vCPU
(guest_tsc.py): IA32_TSC is saved as RDTSC reads it, and a restore sets the offset so the
TSC goes on from the saved value, as on KVM.
"""

from __future__ import annotations

import dataclasses

import unicorn.x86_const as X

from ...arch.x86_64 import msrs as M
from ...arch.x86_64.cpu_state import (
    CR0_PE, CR0_PG, EFER_LMA, EFER_LME, GPR_NAMES, SEGMENT_NAMES, SHADOW_STI, XSTATE_X87, CpuState,
    DescriptorTable, EventsState, FpuState, Segment, SegmentState, TableState, VcpuState,
)
from ...persist import StateError
from ...platform.lapic_registers import REG_TPR
from .guest_tsc import GuestTsc, host_tsc, tsc_offset_field
from .private_state import HF_CPL_MASK, HF_INHIBIT_IRQ_MASK

# QEMU's TCG implements these (target/i386 helper_rdmsr/helper_wrmsr); the rest of SAVED_MSRS
# are KVM's or belong to a device the platform models (TSC deadline: the LAPIC timer).
TCG_MSRS = tuple(i for i in M.SAVED_MSRS if i not in M.KVM_PARAVIRTUAL_MSRS
                 and i not in (M.MSR_IA32_TSC_DEADLINE, M.MSR_IA32_TSC_ADJUST))
_GPR_REGS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES}
_CACHED_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
TABLE_SEGMENTS = {"tr": X.UC_X86_REG_TR, "ldt": X.UC_X86_REG_LDTR}
_FP_REGS = [getattr(X, f"UC_X86_REG_FP{i}") for i in range(8)]
_XMM_REGS = [getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16)]
_DR_REGS = [X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3]
DESCRIPTOR_ATTRIBUTE_BITS = 0x00F0FF00


def segment_from_cache(selector: int, base: int, limit: int, flags: int) -> SegmentState:
    """QEMU's segment cache (flags: the descriptor's high dword) as KVM describes a segment
    (unusable: not present, as QEMU's own KVM code says)."""
    present = flags >> 15 & 1
    return SegmentState(selector=selector, base=base, limit=limit, type=flags >> 8 & 0xF, present=present,
                        dpl=flags >> 13 & 3, db=flags >> 22 & 1, s=flags >> 12 & 1, l=flags >> 21 & 1,
                        g=flags >> 23 & 1, avl=flags >> 20 & 1, unusable=0 if present else 1)


def cache_flags(segment: SegmentState) -> int:
    return ((segment.type << 8) | (segment.s << 12) | (segment.dpl << 13) | (segment.present << 15)
            | (segment.avl << 20) | (segment.l << 21) | (segment.db << 22) | (segment.g << 23))


# --- save ---------------------------------------------------------------------------------------

def save(vcpu) -> VcpuState:
    uc, private = vcpu.uc, vcpu.private
    hflags = private.finish_exception()  # what the next slice would do first: nothing in flight
    caches = private.read_segments()
    segments = {name: segment_from_cache(*caches[name]) for name in _CACHED_SEGMENTS}
    cpl = hflags & HF_CPL_MASK
    if uc.reg_read(X.UC_X86_REG_CR0) & CR0_PE and segments["ss"].dpl != cpl:
        # The CPL is the translator's (hflags); a state gives it as SS.DPL, as KVM does. A path
        # that set the CPL without loading SS's hidden part must not make a restore change it.
        segments["ss"] = dataclasses.replace(segments["ss"], dpl=cpl)
    for name, reg in TABLE_SEGMENTS.items():
        selector, base, limit, flags = uc.reg_read(reg)
        segments[name] = segment_from_cache(selector, base, limit, flags)
    _, gdt_base, gdt_limit, _ = uc.reg_read(X.UC_X86_REG_GDTR)
    _, idt_base, idt_limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
    lapic = vcpu.lapic
    apic_base = lapic.apic_base if lapic is not None else 0
    cr0, efer = uc.reg_read(X.UC_X86_REG_CR0), uc.msr_read(M.MSR_EFER)
    # LMA is LME with paging on; the engine's power-on context (a vCPU that never ran) has it
    # set without paging, which no restore could reproduce
    efer = efer & ~EFER_LMA | (EFER_LMA if efer & EFER_LME and cr0 & CR0_PG else 0)
    return VcpuState(
        gprs={name: uc.reg_read(reg) for name, reg in _GPR_REGS.items()},
        rip=uc.reg_read(X.UC_X86_REG_RIP), rflags=uc.reg_read(X.UC_X86_REG_RFLAGS),
        segments=segments,
        gdt=TableState(base=gdt_base, limit=gdt_limit), idt=TableState(base=idt_base, limit=idt_limit),
        cr0=cr0, cr2=uc.reg_read(X.UC_X86_REG_CR2), cr3=uc.reg_read(X.UC_X86_REG_CR3),
        cr4=uc.reg_read(X.UC_X86_REG_CR4), cr8=_tpr(lapic) >> 4 if lapic is not None else 0,
        efer=efer, apic_base=apic_base,
        dr=tuple(uc.reg_read(r) for r in _DR_REGS),
        dr6=uc.reg_read(X.UC_X86_REG_DR6), dr7=uc.reg_read(X.UC_X86_REG_DR7),
        fpu=_save_fpu(uc), xsave=None,
        msrs={i: guest_tsc(vcpu) if i == M.MSR_IA32_TSC else uc.msr_read(i) for i in TCG_MSRS},
        events=dataclasses.replace(EventsState.none(),
                                   interrupt_shadow=SHADOW_STI if hflags & HF_INHIBIT_IRQ_MASK else 0),
        mp_state="uninitialized" if vcpu.waiting_for_sipi else ("halted" if vcpu.halted else "runnable"),
        lapic=None,
    )


def guest_tsc(vcpu) -> int:
    """The TSC as the guest's RDTSC reads it now, or where it stood when the VM was paused."""
    if vcpu.frozen_tsc is not None:
        return vcpu.frozen_tsc
    return _tsc_at(vcpu.uc, host_tsc())


def _tsc_at(uc, host: int) -> int:
    """The TSC of the vCPU whose context `uc` holds, when the host's reads `host`."""
    return (host + GuestTsc(uc, tsc_offset_field()).offset) & ((1 << 64) - 1)


def _set_tsc_at(uc, value: int, host: int) -> None:
    """Make that vCPU's TSC read `value` when the host's reads `host` (and count on from there)."""
    GuestTsc(uc, tsc_offset_field()).offset = _signed64(value - host)


def freeze_tscs(vcpus) -> None:
    """The VM pauses: remember where each vCPU's TSC stands (its RDTSC is the host's plus an
    offset, and the host's keeps counting). One host reading serves them all: a reading per
    vCPU would put the later ones ahead by the microseconds between, and that skew would grow
    with every pause until Linux finds the TSCs out of step (a "TSC warp" on a CPU's online)."""
    host = host_tsc()
    for vcpu in vcpus:
        if vcpu.frozen_tsc is None:
            vcpu.translator.activate(vcpu)
            vcpu.frozen_tsc = _tsc_at(vcpu.uc, host)


def thaw_tscs(vcpus) -> None:
    """The VM resumes: each TSC goes on from where it stood, the pause left out; again one host
    reading for all, so the vCPUs' offsets keep their differences exactly."""
    host = host_tsc()
    for vcpu in vcpus:
        if vcpu.frozen_tsc is not None:
            vcpu.translator.activate(vcpu)
            _set_tsc_at(vcpu.uc, vcpu.frozen_tsc, host)
            vcpu.frozen_tsc = None


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _tpr(lapic) -> int:
    """CR8 is the LAPIC's task priority (bits 7:4), and the software CPU's LAPIC is the platform's."""
    return int.from_bytes(lapic.read(REG_TPR, 4), "little")


def _save_fpu(uc) -> FpuState:
    fsw = uc.reg_read(X.UC_X86_REG_FPSW)
    top = fsw >> 11 & 7
    full_tags = uc.reg_read(X.UC_X86_REG_FPTAG)
    abridged = 0
    st = []
    for i in range(8):
        physical = (top + i) & 7
        mantissa, exponent = uc.reg_read(_FP_REGS[physical])
        st.append(mantissa.to_bytes(8, "little") + exponent.to_bytes(2, "little"))
    for physical in range(8):  # FXSAVE's abridged tag word is indexed by physical register
        if (full_tags >> (2 * physical)) & 3 != 3:
            abridged |= 1 << physical
    return FpuState(fcw=uc.reg_read(X.UC_X86_REG_FPCW), fsw=fsw, ftw=abridged,
                    fop=uc.reg_read(X.UC_X86_REG_FOP), fip=uc.reg_read(X.UC_X86_REG_FIP),
                    fdp=uc.reg_read(X.UC_X86_REG_FDP), mxcsr=uc.reg_read(X.UC_X86_REG_MXCSR),
                    st=tuple(st), xmm=tuple(uc.reg_read(r).to_bytes(16, "little") for r in _XMM_REGS))


def load_fpu_controls(uc, fpu_control: int, mxcsr: int) -> None:
    """The x87 control word and MXCSR of a boot or INIT state, as KVM's set_state loads them
    (Unicorn starts with MXCSR 0, every SSE exception unmasked; the SDM's reset value is 0x1F80)."""
    uc.reg_write(X.UC_X86_REG_FPCW, fpu_control)
    uc.reg_write(X.UC_X86_REG_MXCSR, mxcsr)


# --- restore ------------------------------------------------------------------------------------

def check_restorable(state: VcpuState) -> None:
    where = "x86-vcpu state"
    if state.xsave is not None and (state.xsave.components or state.xsave.xcr0 & ~XSTATE_X87 & ~0x2):
        raise StateError(f"{where}: xsave: the software CPU has no XSAVE (the guest enabled XCR0 {state.xsave.xcr0:#x})")
    for index, value in state.msrs.items():
        if index not in TCG_MSRS and not M.at_reset_value(index, value):
            raise StateError(f"{where}: msrs[{index:#x}]: the software CPU has no such MSR (value {value:#x})")
    if state.lapic is not None:
        raise StateError(f"{where}: lapic: the software CPU's LAPIC is the platform's and restores from the "
                         "platform state, not from a KVM LAPIC page")
    e = state.events
    undelivered = [name for name in ("exception_injected", "exception_pending", "interrupt_injected", "nmi_injected",
                                     "nmi_pending", "smm", "smi_pending", "latched_init", "triple_fault_pending")
                   if getattr(e, name)]
    if undelivered:
        raise StateError(f"{where}: events.{undelivered[0]}: the software CPU delivers events at once and cannot "
                         "take one KVM had not delivered")
    if e.nmi_masked:
        raise StateError(f"{where}: events.nmi_masked: the software CPU cannot restore NMI blocking")
    if state.mp_state == "sipi-received":
        raise StateError(f"{where}: mp_state: the software CPU has no 'sipi-received' state")


def restore(vcpu, state: VcpuState) -> None:
    check_restorable(state)
    uc, private = vcpu.uc, vcpu.private
    _load_tables_and_control(uc, state)
    for name in _CACHED_SEGMENTS:
        seg = state.segments[name]
        private.load_segment(name, seg.selector, seg.base, seg.limit, cache_flags(seg))
    for name, reg in TABLE_SEGMENTS.items():
        seg = state.segments[name]
        uc.reg_write(reg, (seg.selector, seg.base, seg.limit, cache_flags(seg)))
    for name, reg in _GPR_REGS.items():
        uc.reg_write(reg, state.gprs[name])
    uc.reg_write(X.UC_X86_REG_RFLAGS, state.rflags)
    uc.reg_write(X.UC_X86_REG_RIP, state.rip)
    for reg, value in zip(_DR_REGS, state.dr):
        uc.reg_write(reg, value)
    uc.reg_write(X.UC_X86_REG_DR6, state.dr6)
    uc.reg_write(X.UC_X86_REG_DR7, state.dr7)
    _restore_fpu(uc, state.fpu)
    for index in TCG_MSRS:
        if index in state.msrs and index != M.MSR_IA32_TSC:  # Unicorn's TSC MSR is not RDTSC's
            uc.msr_write(index, state.msrs[index])
    if M.MSR_IA32_TSC in state.msrs:
        _set_tsc_at(uc, state.msrs[M.MSR_IA32_TSC], host_tsc())
        if vcpu.frozen_tsc is not None:  # restored into a paused VM: it resumes from the saved TSC
            vcpu.frozen_tsc = state.msrs[M.MSR_IA32_TSC]
    cs, ss = state.segments["cs"], state.segments["ss"]
    protected = bool(state.cr0 & CR0_PE)
    code64 = bool(state.efer & EFER_LMA and cs.l)
    code32 = code64 or bool(protected and cs.db)
    addseg = not code64 and (not protected or not code32 or bool(
        state.segments["ds"].base | state.segments["es"].base | ss.base))
    private.set_translation_flags(cpl=ss.dpl if protected else 0, code64=code64, code32=code32,
                                  stack32=code64 or bool(protected and ss.db), addseg=addseg,
                                  inhibit_irq=bool(state.events.interrupt_shadow))
    lapic = vcpu.lapic
    if lapic is not None and lapic.apic_base != state.apic_base:
        lapic.write_apic_base(state.apic_base)
    if lapic is not None and _tpr(lapic) >> 4 != state.cr8:  # as MOV to CR8 would (KVM_SET_SREGS does)
        lapic.write(REG_TPR, (state.cr8 << 4).to_bytes(4, "little"))
    vcpu.waiting_for_sipi = state.mp_state in ("uninitialized", "init-received")
    vcpu.halted = state.mp_state == "halted"


def _restore_fpu(uc, fpu: FpuState) -> None:
    top = fpu.fsw >> 11 & 7
    full_tags = 0
    for physical in range(8):
        full_tags |= (0 if fpu.ftw >> physical & 1 else 3) << (2 * physical)
    uc.reg_write(X.UC_X86_REG_FPCW, fpu.fcw)
    uc.reg_write(X.UC_X86_REG_FPSW, fpu.fsw)
    for i, raw in enumerate(fpu.st):
        uc.reg_write(_FP_REGS[(top + i) & 7], (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")))
    uc.reg_write(X.UC_X86_REG_FPTAG, full_tags)
    uc.reg_write(X.UC_X86_REG_FOP, fpu.fop)
    uc.reg_write(X.UC_X86_REG_FIP, fpu.fip)
    uc.reg_write(X.UC_X86_REG_FDP, fpu.fdp)
    uc.reg_write(X.UC_X86_REG_MXCSR, fpu.mxcsr)
    for reg, raw in zip(_XMM_REGS, fpu.xmm):
        uc.reg_write(reg, int.from_bytes(raw, "little"))


def cpu_state(vcpu) -> CpuState:
    """The registers a boot entry sets (TcgVcpu.set_state), hidden segment parts included (as
    KVM's get_state reads them)."""
    uc = vcpu.uc
    state = CpuState(
        gprs={name: uc.reg_read(reg) for name, reg in _GPR_REGS.items()},
        rip=uc.reg_read(X.UC_X86_REG_RIP), rflags=uc.reg_read(X.UC_X86_REG_RFLAGS),
        cr0=uc.reg_read(X.UC_X86_REG_CR0), cr2=uc.reg_read(X.UC_X86_REG_CR2),
        cr3=uc.reg_read(X.UC_X86_REG_CR3), cr4=uc.reg_read(X.UC_X86_REG_CR4),
        efer=uc.msr_read(M.MSR_EFER),
    )
    _, base, limit, _ = uc.reg_read(X.UC_X86_REG_GDTR)
    state.gdt = DescriptorTable(base, limit)
    _, base, limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
    state.idt = DescriptorTable(base, limit)
    caches = vcpu.private.read_segments()
    for name in SEGMENT_NAMES:
        cache = caches[name] if name in caches else uc.reg_read(TABLE_SEGMENTS[name])
        state.segments[name] = segment_from_cache(*cache).as_segment()
    state.cr8 = uc.reg_read(X.UC_X86_REG_CR8) & 0xF
    state.fpu_control, state.mxcsr = uc.reg_read(X.UC_X86_REG_FPCW), uc.reg_read(X.UC_X86_REG_MXCSR)
    state.msrs = {i: uc.msr_read(i) for i in (M.MSR_STAR, M.MSR_LSTAR, M.MSR_SYSCALL_MASK, M.MSR_FS_BASE,
                                              M.MSR_GS_BASE, M.MSR_KERNEL_GS_BASE)}
    return state


# --- a boot entry's registers, and an AP's start ------------------------------------------------

# QEMU segment-cache flags (descriptor high dword): present, code/data, accessed (+readable code / writable data)
REAL_MODE_CODE_FLAGS = (1 << 15) | (1 << 12) | (1 << 11) | (1 << 9) | (1 << 8)
REAL_MODE_DATA_FLAGS = (1 << 15) | (1 << 12) | (1 << 9) | (1 << 8)
DESCRIPTOR_ATTRIBUTE_BITS = 0x00F0FF00  # type, S, DPL, P, AVL, L, D/B, G of a descriptor's high dword


def _descriptor_flags(segment: Segment) -> int:
    """A Segment's attributes in QEMU's segment-cache layout: its descriptor's attribute bits."""
    return (segment.descriptor() >> 32) & DESCRIPTOR_ATTRIBUTE_BITS


def load_cpu_state(vcpu, state: CpuState) -> None:
    """A CpuState (what a boot protocol hands the first instruction) into the engine."""
    uc, private = vcpu.uc, vcpu.private
    _load_tables_and_control(uc, state)
    # Hidden segment state exactly as the CpuState has it (the register API sets selectors only).
    for name, segment in state.segments.items():
        if name in _CACHED_SEGMENTS:
            private.load_segment(name, segment.selector, segment.base, segment.limit, _descriptor_flags(segment))
    if "cs" in state.segments:
        cs = state.segments["cs"]
        private.set_code_size(long_code=bool(cs.l), default_32=bool(cs.db))
    for name, reg in TABLE_SEGMENTS.items():
        if name in state.segments:
            seg = state.segments[name]
            uc.reg_write(reg, (seg.selector, seg.base, seg.limit, _descriptor_flags(seg)))
    for name, reg in _GPR_REGS.items():
        uc.reg_write(reg, state.gprs.get(name, 0))
    uc.reg_write(X.UC_X86_REG_RFLAGS, state.rflags)
    uc.reg_write(X.UC_X86_REG_RIP, state.rip)
    load_fpu_controls(uc, state.fpu_control, state.mxcsr)
    for index, value in state.msrs.items():
        uc.msr_write(index, value)


def load_startup_state(vcpu, vector: int) -> None:
    """Real mode at vector:0000 with INIT's registers, as an AP starts on a startup IPI."""
    uc, private = vcpu.uc, vcpu.private
    _leave_paging(uc, 0x10)
    uc.msr_write(M.MSR_EFER, 0)
    uc.reg_write(X.UC_X86_REG_CR4, 0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        private.load_segment(name, 0, 0, 0xFFFF, REAL_MODE_DATA_FLAGS)
    # the register API would load the selector only: real mode needs base = selector << 4
    private.load_segment("cs", vector << 8, vector << 12, 0xFFFF, REAL_MODE_CODE_FLAGS)
    private.set_code_size(long_code=False, default_32=False)  # real mode: 16-bit code
    uc.reg_write(X.UC_X86_REG_RIP, 0)
    uc.reg_write(X.UC_X86_REG_RFLAGS, 2)
    load_fpu_controls(uc, CpuState.fpu_control, CpuState.mxcsr)  # INIT's values


def _load_tables_and_control(uc, state: VcpuState | CpuState) -> None:
    """GDTR and IDTR; then out of any long mode, CR3/CR4/EFER, then CR0: the CPU enters long
    mode on the CR0.PG transition, exactly as a kernel's own mode switch does."""
    uc.reg_write(X.UC_X86_REG_GDTR, (0, state.gdt.base, state.gdt.limit, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, state.idt.base, state.idt.limit, 0))
    _leave_paging(uc, state.cr0 & ~CR0_PG)
    uc.reg_write(X.UC_X86_REG_CR3, state.cr3)
    uc.reg_write(X.UC_X86_REG_CR4, state.cr4)
    uc.msr_write(M.MSR_EFER, state.efer & ~EFER_LMA)
    uc.reg_write(X.UC_X86_REG_CR0, state.cr0)
    uc.reg_write(X.UC_X86_REG_CR2, state.cr2)


def _leave_paging(uc, cr0_without_paging: int) -> None:
    """Paging off, out of long mode: QEMU clears EFER.LMA only on a CR0.PG 1 -> 0 transition."""
    uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | CR0_PG | CR0_PE)
    uc.reg_write(X.UC_X86_REG_CR0, cr0_without_paging)
