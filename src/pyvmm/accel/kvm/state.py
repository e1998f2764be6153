"""A KVM vCPU's complete state to and from the backend-neutral VcpuState.

The restore order follows KVM's API document and the VMMs built on it (QEMU's
kvm_arch_put_registers): CPUID is set when the vCPU is created; then general registers,
XSAVE (or FPU) and XCRs, special registers (which also set the APIC base), MSRs
(IA32_TSC among the first, so everything timed against it agrees), MP state, the LAPIC
page (which stops the LAPIC timer), TSC_DEADLINE (re-arming it), pending events (after
the LAPIC, which would otherwise drop them) and debug registers.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...arch.x86_64 import msrs as M
from ...arch.x86_64.cpu_state import (
    FXSAVE_SIZE, GPR_NAMES, SEGMENT_NAMES, XSTATE_SSE, XSTATE_X87, EventsState, FpuState, SegmentState,
    TableState, VcpuState, XsaveState,
)
from ...kvm import uapi
from ...persist import State, StateError

if TYPE_CHECKING:
    from .accelerator import KvmAccelerator

log = logging.getLogger(__name__)

MP_STATE_NAMES = {
    uapi.KVM_MP_STATE_RUNNABLE: "runnable",
    uapi.KVM_MP_STATE_UNINITIALIZED: "uninitialized",
    uapi.KVM_MP_STATE_INIT_RECEIVED: "init-received",
    uapi.KVM_MP_STATE_HALTED: "halted",
    uapi.KVM_MP_STATE_SIPI_RECEIVED: "sipi-received",
}
MP_STATE_VALUES = {name: value for value, name in MP_STATE_NAMES.items()}
XSTATE_BV_OFFSET = FXSAVE_SIZE
XSAVE_CPUID_LEAF = 0xD


def xsave_layout(accel: "KvmAccelerator") -> dict[int, tuple[int, int]]:
    """component -> (offset, size) in KVM's XSAVE area (the host's CPUID leaf 0xD, standard format)."""
    return {e.index: (e.ebx, e.eax) for e in accel.supported_cpuid
            if e.function == XSAVE_CPUID_LEAF and 2 <= e.index < 64 and e.eax}


# --- save ---------------------------------------------------------------------------------------

def save_vcpu(accel: "KvmAccelerator", fd) -> VcpuState:
    regs, sregs = fd.get_regs(), fd.get_sregs()
    fpu, xsave = _save_fpu(accel, fd)
    debug = fd.get_debugregs()
    wanted = [i for i in M.SAVED_MSRS if i in accel.supported_msrs() or i in M.KVM_UNLISTED_MSRS]
    msr_values, _refused = fd.get_msrs_skipping_refused(wanted)
    mp_state = fd.get_mp_state()
    if mp_state not in MP_STATE_NAMES:
        raise StateError(f"x86-vcpu state: mp_state: KVM reports MP state {mp_state}, which pyvmm cannot save")
    return VcpuState(
        gprs={name: getattr(regs, name) for name in GPR_NAMES},
        rip=regs.rip, rflags=regs.rflags,
        segments={name: _segment_state(getattr(sregs, name)) for name in SEGMENT_NAMES},
        gdt=TableState(base=sregs.gdt.base, limit=sregs.gdt.limit),
        idt=TableState(base=sregs.idt.base, limit=sregs.idt.limit),
        cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4, cr8=sregs.cr8,
        efer=sregs.efer, apic_base=sregs.apic_base,
        dr=tuple(debug.db), dr6=debug.dr6, dr7=debug.dr7,
        fpu=fpu, xsave=xsave,
        msrs={i: msr_values[i] for i in M.SAVED_MSRS if i in msr_values},
        events=_events_state(fd.get_vcpu_events()),
        mp_state=MP_STATE_NAMES[mp_state],
        lapic=bytes(fd.get_lapic()),
    )


def _segment_state(seg) -> SegmentState:
    return SegmentState(selector=seg.selector, base=seg.base, limit=seg.limit, type=seg.type, present=seg.present,
                        dpl=seg.dpl, db=seg.db, s=seg.s, l=seg.l, g=seg.g, avl=seg.avl, unusable=seg.unusable)


def _save_fpu(accel: "KvmAccelerator", fd) -> tuple[FpuState, XsaveState | None]:
    size = accel.xsave_size
    if size is None:
        f = fd.get_fpu()
        return FpuState(fcw=f.fcw, fsw=f.fsw, ftw=f.ftwx, fop=f.last_opcode, fip=f.last_ip, fdp=f.last_dp,
                        mxcsr=f.mxcsr, st=tuple(bytes(r)[:10] for r in f.fpr),
                        xmm=tuple(bytes(r) for r in f.xmm)), None
    area = fd.get_xsave(size)
    in_use = struct.unpack_from("<Q", area, XSTATE_BV_OFFSET)[0]
    xcr0 = next((x.value for x in _xcrs(fd) if x.xcr == 0), XSTATE_X87 | XSTATE_SSE)
    fpu = FpuState.from_fxsave(area[:FXSAVE_SIZE])
    # XSTATE_BV may mark a component in use that is in its initial configuration (the SDM allows
    # it: XINUSE; KVM_RUN's XSAVE sets the SSE bit now and then, even for an immediate exit). The
    # saved bits are the components whose contents differ from their initial configuration, so one
    # vCPU state always saves the same way. Beyond SSE that configuration is all zeros; this also
    # drops the PKRU KVM fills in where the host has it, whatever the guest's XCR0 enables.
    layout = xsave_layout(accel)
    xstate_bv = _legacy_in_use(fpu)
    components = {}
    for number, (offset, length) in layout.items():
        data = area[offset:offset + length]
        if in_use >> number & 1 and any(data):
            components[number] = data
            xstate_bv |= 1 << number
    # A component KVM reports in use but the layout lacks cannot be saved: say so rather than drop it.
    unknown = [n for n in range(2, 64) if in_use >> n & 1 and n not in layout]
    if unknown:
        raise StateError(f"x86-xsave state: components: XSAVE component {unknown[0]} is in use but this host's CPUID leaf 0xD does not describe it")
    return fpu, XsaveState(xcr0=xcr0, xstate_bv=xstate_bv, components=components)


def _xcrs(fd):
    xcrs = fd.get_xcrs()
    return xcrs.xcrs[:xcrs.nr_xcrs]


def _events_state(e) -> EventsState:
    has_payload = bool(e.flags & uapi.KVM_VCPUEVENT_VALID_PAYLOAD and e.exception_has_payload)
    return EventsState(
        exception_injected=bool(e.exception.injected), exception_pending=bool(e.exception.pending),
        exception_vector=e.exception.nr,
        exception_error_code=e.exception.error_code if e.exception.has_error_code else None,
        exception_payload=e.exception_payload if has_payload else None,
        interrupt_injected=bool(e.interrupt.injected), interrupt_vector=e.interrupt.nr,
        interrupt_soft=bool(e.interrupt.soft),
        interrupt_shadow=e.interrupt.shadow if e.flags & uapi.KVM_VCPUEVENT_VALID_SHADOW else 0,
        nmi_injected=bool(e.nmi.injected), nmi_pending=bool(e.nmi.pending), nmi_masked=bool(e.nmi.masked),
        sipi_vector=e.sipi_vector,
        smm=bool(e.smi.smm), smi_pending=bool(e.smi.pending), latched_init=bool(e.smi.latched_init),
        triple_fault_pending=bool(e.flags & uapi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT and e.triple_fault_pending),
    )


# --- restore -------------------------------------------------------------------------------------

def check_restorable(accel: "KvmAccelerator", state: VcpuState) -> None:
    """Everything that can be refused before the first ioctl: one StateError naming the field."""
    supported = accel.supported_msrs() | M.KVM_UNLISTED_MSRS
    for index, value in state.msrs.items():
        if index not in supported and not M.at_reset_value(index, value):
            raise StateError(f"x86-vcpu state: msrs[{index:#x}]: this host's KVM has no such MSR (value {value:#x})")
    if state.lapic is None:
        raise StateError("x86-vcpu state: lapic: KVM keeps each vCPU's LAPIC in the kernel and needs its saved page "
                         "(this state comes from a backend whose platform saves the LAPIC)")
    events = state.events
    if events.exception_payload is not None:
        raise StateError("x86-vcpu state: events.exception_payload: pyvmm does not enable KVM's exception payloads")
    if events.smm or events.smi_pending or events.latched_init:
        raise StateError("x86-vcpu state: events.smm: pyvmm's KVM vCPUs have no SMM")
    if events.triple_fault_pending:
        raise StateError("x86-vcpu state: events.triple_fault_pending: a vCPU saved in the middle of a triple fault")
    xsave = state.xsave
    if xsave is not None and xsave.components:
        if accel.xsave_size is None:
            raise StateError("x86-vcpu state: xsave: this host's KVM has no XSAVE, and the state uses AVX or later components")
        layout = xsave_layout(accel)
        for number, data in xsave.components.items():
            if number not in layout or layout[number][1] != len(data) or sum(layout[number]) > accel.xsave_size:
                raise StateError(f"x86-vcpu state: xsave.components: XSAVE component {number} ({len(data)} bytes) is not one this host's KVM has")


def restore_vcpu(accel: "KvmAccelerator", fd, state: VcpuState) -> None:
    check_restorable(accel, state)
    regs = uapi.kvm_regs(**state.gprs, rip=state.rip, rflags=state.rflags)
    fd.set_regs(regs)
    _restore_fpu(accel, fd, state)
    sregs = uapi.kvm_sregs()
    for name, seg in state.segments.items():
        target = getattr(sregs, name)
        for field in ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
            setattr(target, field, getattr(seg, field))
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8 = state.cr0, state.cr2, state.cr3, state.cr4, state.cr8
    sregs.efer, sregs.apic_base = state.efer, state.apic_base
    fd.set_sregs(sregs)
    supported = accel.supported_msrs() | M.KVM_UNLISTED_MSRS
    early = {i: state.msrs[i] for i in M.SAVED_MSRS
             if i in state.msrs and i in supported and i != M.MSR_IA32_TSC_DEADLINE}
    _set_msrs(fd, early)
    if M.MSR_IA32_TSC in early:
        _check_tsc_taken(fd, early[M.MSR_IA32_TSC])
    fd.set_mp_state(MP_STATE_VALUES[state.mp_state])
    assert state.lapic is not None  # check_restorable() refused it
    fd.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(state.lapic))
    if M.MSR_IA32_TSC_DEADLINE in state.msrs and M.MSR_IA32_TSC_DEADLINE in supported:
        _set_msrs(fd, {M.MSR_IA32_TSC_DEADLINE: state.msrs[M.MSR_IA32_TSC_DEADLINE]})
    fd.set_vcpu_events(_kvm_events(state.events))
    debug = uapi.kvm_debugregs(dr6=state.dr6, dr7=state.dr7)
    debug.db[:] = state.dr
    fd.set_debugregs(debug)


_warned_tsc = False


def _check_tsc_taken(fd, wanted: int) -> None:
    """A KVM that runs guests without TSC offsetting (kvm_pvm does) ignores the value: say so
    once; the guest's TSC is then the host's and counts the time the VM spent saved."""
    global _warned_tsc
    got = fd.get_msrs([M.MSR_IA32_TSC]).get(M.MSR_IA32_TSC, wanted)
    if abs(got - wanted) > fd.get_tsc_khz() * 1000 and not _warned_tsc:  # more than a second off
        _warned_tsc = True
        log.warning("this host's KVM does not set a vCPU's TSC: the restored guest's TSC is the host's "
                    "(it counts the time the VM spent saved)")


def _set_msrs(fd, values: dict[int, int]) -> None:
    done = fd.set_msrs(values)
    if done != len(values):
        index = list(values)[done]
        raise StateError(f"x86-vcpu state: msrs[{index:#x}]: KVM refused the value {values[index]:#x}")


def _restore_fpu(accel: "KvmAccelerator", fd, state: VcpuState) -> None:
    size = accel.xsave_size
    if size is None:
        f = uapi.kvm_fpu(fcw=state.fpu.fcw, fsw=state.fpu.fsw, ftwx=state.fpu.ftw, last_opcode=state.fpu.fop,
                         last_ip=state.fpu.fip, last_dp=state.fpu.fdp, mxcsr=state.fpu.mxcsr)
        for i, reg in enumerate(state.fpu.st):
            f.fpr[i][:10] = reg
        for i, reg in enumerate(state.fpu.xmm):
            f.xmm[i][:] = reg
        fd.set_fpu(f)
        return
    area = bytearray(fd.get_xsave(size))  # the fresh vCPU's: keeps KVM's MXCSR_MASK and reserved bytes
    mxcsr_mask = struct.unpack_from("<I", area, 28)[0]
    area[:FXSAVE_SIZE] = state.fpu.fxsave(mxcsr_mask)
    xsave = state.xsave
    xstate_bv = (xsave.xstate_bv if xsave is not None else 0) | _legacy_in_use(state.fpu)
    struct.pack_into("<Q", area, XSTATE_BV_OFFSET, xstate_bv)
    layout = xsave_layout(accel)
    for number, data in (xsave.components if xsave is not None else {}).items():
        offset = layout[number][0]
        area[offset:offset + len(data)] = data
    if xsave is not None:
        # XCR0 before the area: KVM checks the area's components against what the guest may use
        xcrs = uapi.kvm_xcrs(nr_xcrs=1)
        xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, xsave.xcr0
        fd.set_xcrs(xcrs)
    fd.set_xsave(bytes(area))


def _legacy_in_use(fpu: FpuState) -> int:
    """XSTATE_BV bits for the x87 and SSE parts that are not in their initial state."""
    init = FpuState.reset()
    x87 = (fpu.fcw, fpu.fsw, fpu.ftw, fpu.fop, fpu.fip, fpu.fdp, fpu.st) != \
        (init.fcw, init.fsw, init.ftw, init.fop, init.fip, init.fdp, init.st)
    sse = (fpu.xmm, fpu.mxcsr) != (init.xmm, init.mxcsr)
    return (XSTATE_X87 if x87 else 0) | (XSTATE_SSE if sse else 0)


def _kvm_events(events: EventsState) -> uapi.kvm_vcpu_events:
    e = uapi.kvm_vcpu_events()
    # Without KVM_CAP_EXCEPTION_PAYLOAD KVM has no "pending" exception: it re-delivers an injected one.
    e.exception.injected = int(events.exception_injected or events.exception_pending)
    e.exception.nr = events.exception_vector
    e.exception.has_error_code = int(events.exception_error_code is not None)
    e.exception.error_code = events.exception_error_code or 0
    e.interrupt.injected, e.interrupt.nr = int(events.interrupt_injected), events.interrupt_vector
    e.interrupt.soft, e.interrupt.shadow = int(events.interrupt_soft), events.interrupt_shadow
    e.nmi.injected, e.nmi.pending, e.nmi.masked = int(events.nmi_injected), int(events.nmi_pending), int(events.nmi_masked)
    e.sipi_vector = events.sipi_vector
    e.flags = uapi.KVM_VCPUEVENT_VALID_NMI_PENDING | uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR | uapi.KVM_VCPUEVENT_VALID_SHADOW
    return e


# --- VM-wide: the in-kernel PIC pair, IOAPIC, PIT and kvm-clock ------------------------------

PIC_FIELDS = tuple(field[0] for field in uapi.kvm_pic_state._fields_)
PIT_CHANNEL_FIELDS = ("count", "latched_count", "count_latched", "status_latched", "status", "read_state",
                      "write_state", "write_latch", "rw_mode", "mode", "bcd", "gate")
_PIT_FIELD_MAX = {"count": 0x10000, "latched_count": 0xFFFF}


@dataclass(frozen=True)
class PicState(State):
    """One 8259 of KVM's in-kernel pair (struct kvm_pic_state: every field a byte)."""

    KIND: ClassVar[str] = "kvm-pic"
    registers: dict[str, int]

    def validate(self) -> None:
        if set(self.registers) != set(PIC_FIELDS):
            self.fail("registers", f"expected exactly {', '.join(PIC_FIELDS)}")
        for name, value in self.registers.items():
            if not 0 <= value <= 0xFF:
                self.fail(f"registers[{name}]", f"{value} is outside 0..255")


@dataclass(frozen=True)
class IoapicState(State):
    KIND: ClassVar[str] = "kvm-ioapic"
    base_address: int
    ioregsel: int
    id: int
    irr: int
    redirection: tuple[int, ...]  # the 24 64-bit redirection-table entries

    def validate(self) -> None:
        self.check_range("base_address", 0, (1 << 64) - 1)
        for name in ("ioregsel", "id", "irr"):
            self.check_range(name, 0, 0xFFFFFFFF)
        if len(self.redirection) != uapi.KVM_IOAPIC_NUM_PINS or any(not 0 <= r < 1 << 64 for r in self.redirection):
            self.fail("redirection", f"expected {uapi.KVM_IOAPIC_NUM_PINS} 64-bit entries")


@dataclass(frozen=True)
class PitChannelState(State):
    """One 8254 channel. KVM restarts the count when the state is set (KVM_SET_PIT2 reloads
    it), so the time a count had already run is not part of the state."""

    KIND: ClassVar[str] = "kvm-pit-channel"
    registers: dict[str, int]

    def validate(self) -> None:
        if set(self.registers) != set(PIT_CHANNEL_FIELDS):
            self.fail("registers", f"expected exactly {', '.join(PIT_CHANNEL_FIELDS)}")
        for name, value in self.registers.items():
            if not 0 <= value <= _PIT_FIELD_MAX.get(name, 0xFF):
                self.fail(f"registers[{name}]", f"{value} is out of range")


@dataclass(frozen=True)
class KvmVmState(State):
    """What KVM keeps per VM rather than per vCPU. kvm-clock is the guest's clock when saved:
    restored, it continues from there (like the TSC, see VcpuState), so the time the VM
    spent saved is not seen by the guest."""

    KIND: ClassVar[str] = "kvm-vm"
    pic_master: PicState
    pic_slave: PicState
    ioapic: IoapicState
    pit_channels: tuple[PitChannelState, PitChannelState, PitChannelState]
    pit_flags: int
    clock_ns: int

    def validate(self) -> None:
        self.check_range("pit_flags", 0, 0xFFFFFFFF)
        self.check_range("clock_ns", 0, (1 << 64) - 1)


def save_vm(vm_fd) -> KvmVmState:
    pics = []
    for chip_id in (uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_PIC_SLAVE):
        pic = vm_fd.get_irqchip(chip_id).chip.pic
        pics.append(PicState(registers={name: getattr(pic, name) for name in PIC_FIELDS}))
    io = vm_fd.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC).chip.ioapic
    pit = vm_fd.get_pit2()
    channels = [PitChannelState(registers={name: getattr(ch, name) for name in PIT_CHANNEL_FIELDS})
                for ch in pit.channels]
    return KvmVmState(
        pic_master=pics[0], pic_slave=pics[1],
        ioapic=IoapicState(base_address=io.base_address, ioregsel=io.ioregsel, id=io.id, irr=io.irr,
                           redirection=tuple(io.redirtbl)),
        pit_channels=(channels[0], channels[1], channels[2]),
        pit_flags=pit.flags,
        clock_ns=vm_fd.get_clock().clock,
    )


def restore_vm(vm_fd, state: KvmVmState) -> None:
    """Load a saved VM-wide state (into a fresh VM with its irqchip and PIT created)."""
    for chip_id, pic_state in ((uapi.KVM_IRQCHIP_PIC_MASTER, state.pic_master),
                               (uapi.KVM_IRQCHIP_PIC_SLAVE, state.pic_slave)):
        chip = uapi.kvm_irqchip(chip_id=chip_id)
        for name, value in pic_state.registers.items():
            setattr(chip.chip.pic, name, value)
        vm_fd.set_irqchip(chip)
    chip = uapi.kvm_irqchip(chip_id=uapi.KVM_IRQCHIP_IOAPIC)
    io = chip.chip.ioapic
    io.base_address, io.ioregsel, io.id, io.irr = (state.ioapic.base_address, state.ioapic.ioregsel,
                                                   state.ioapic.id, state.ioapic.irr)
    io.redirtbl[:] = state.ioapic.redirection
    vm_fd.set_irqchip(chip)
    pit = uapi.kvm_pit_state2(flags=state.pit_flags)
    for target, channel in zip(pit.channels, state.pit_channels):
        for name, value in channel.registers.items():
            setattr(target, name, value)
    vm_fd.set_pit2(pit)
    vm_fd.set_clock(state.clock_ns)
