"""A VM saved on one accelerator continued on the other: KVM <-> the software CPU.

What differs between the two is where the interrupt controllers and timers live: KVM keeps the
8259 pair, the IOAPIC, the PIT and kvm-clock per VM in the kernel (accel/kvm/state.py) and each
vCPU's LAPIC as a register page in its vCPU state; the software CPU has them as platform models
(platform/machine.py), the LAPICs among them. This module converts one into the other, register
by register, and refuses, in one line naming it, what the destination cannot keep:

- the CPU the guest was shown (GuestCpuView): the destination must offer every CPUID feature
  the guest could have used (compared bit by bit in the leaves it reads features from), and then
  shows the source's table itself (accelerators' keep_guest_view), vendor and model included;
- the TSC rate (KVM scales it where it can, KVM_SET_TSC_KHZ; the software CPU cannot) and the
  LAPIC timer's rate (KVM's is 1 GHz: a software-CPU guest meant to move to KVM is made with
  TcgAccelerator(lapic_timer_hz=KVM_APIC_BUS_HZ));
- kvm-clock in use (the software CPU has none), KVM-only MSRs and events (the software CPU's
  vCPU restore names them), XSAVE state beyond x87/SSE, an INIT/SIPI not yet taken.

Approximations, as KVM's own restore makes them: KVM_SET_PIT2 restarts every PIT count from its
reload value, so the part of a PIT period that had run is lost in both directions; the LAPIC
timer keeps its current count (KVM's page carries it in TMCCT).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from ..arch.x86_64 import layout
from ..arch.x86_64 import msrs as M
from ..arch.x86_64.cpu_state import XSTATE_SSE, XSTATE_X87, GuestCpuView, VcpuState
from ..arch.x86_64.cpuid import FEATURES, CpuidPolicy, bit_name
from ..kvm.system import CpuidEntry
from ..persist import State, StateError, require
from ..platform import lapic_registers as R
from ..platform.clock_state import ClockState
from ..platform.ioapic_state import IoApicState
from ..platform.lapic_state import LapicState
from ..platform.machine_state import SoftwarePlatformState
from ..platform.pic_state import PicChipState, PicPairState
from ..platform.pit_state import ACCESS_LOHI, PORT61_GATE2, PitCounterState, PitState
from .kvm.state import KvmVmState, IoapicState, PicState, PitChannelState

NS_PER_SECOND = 1_000_000_000
# The leaves and registers a guest reads CPU features from; a bit the guest saw set there must
# be set on the destination. OSXSAVE (leaf 1 ECX bit 27) mirrors CR4, it is not a feature.
FEATURE_WORDS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"), (0xD, 0, "eax"),
                 (0xD, 1, "eax"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"), (0x40000001, 0, "eax"))
DYNAMIC_BITS = {(1, 0, "ecx"): 1 << 27}
_FEATURE_NAMES = {(leaf, sub, reg, bit): name for name, (leaf, sub, reg, bit) in FEATURES.items()}
KVM_PIT_MODE_UNPROGRAMMED = 0xFF     # KVM's PIT channel before the guest writes a control word
KVM_RW_WORD1 = 4                     # KVM's read/write state: the MSB of a 16-bit access is next
PIC_ELCR_MASKS = (0xF8, 0xDE)        # KVM's: the inputs that may be level-triggered
PIC_CASCADE_IR = 2
KVMCLOCK_MSRS = (M.MSR_KVM_SYSTEM_TIME_NEW, M.MSR_KVM_SYSTEM_TIME)


def refuse(field: str, problem: str) -> StateError:
    return StateError(f"vm state: {field}: {problem}")


# --- the CPU the guest saw ----------------------------------------------------------------------

def _word(entries: list[CpuidEntry], leaf: int, subleaf: int, register: str) -> int:
    for e in entries:
        if e.function == leaf and e.index == subleaf:
            return getattr(e, register)
    return 0


def _vendor(entries: list[CpuidEntry]) -> str:
    raw = b"".join(_word(entries, 0, 0, r).to_bytes(4, "little") for r in ("ebx", "edx", "ecx"))
    return raw.decode("latin-1").rstrip("\0") or "(none)"


def missing_features(shown: list[CpuidEntry], offered: list[CpuidEntry]) -> list[str]:
    """The CPUID feature bits set in `shown` and not in `offered`, by name where pyvmm knows it."""
    missing = []
    xsave = _word(shown, *FEATURES["xsave"][:3]) >> FEATURES["xsave"][3] & 1
    for leaf, subleaf, register in FEATURE_WORDS:
        if leaf == 0xD and not xsave:
            continue    # without XSAVE the guest has no use for its components
        lacking = _word(shown, leaf, subleaf, register) & ~_word(offered, leaf, subleaf, register)
        lacking &= ~DYNAMIC_BITS.get((leaf, subleaf, register), 0)
        for bit in range(32):
            if lacking >> bit & 1:
                missing.append(_FEATURE_NAMES.get((leaf, subleaf, register, bit)) or bit_name(leaf, subleaf, register, bit))
    return missing


def check_cpuid(shown: list[CpuidEntry], offered: list[CpuidEntry], destination: str) -> None:
    if _vendor(shown) != _vendor(offered):
        raise refuse("guest_view.cpuid", f"the guest saw a {_vendor(shown)} CPU, {destination} offers {_vendor(offered)}")
    missing = missing_features(shown, offered)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise refuse("guest_view.cpuid", f"the guest saw CPU features {destination} does not offer: "
                     f"{', '.join(missing[:3])}{more}")


# --- the 8259 pair ----------------------------------------------------------------------------

def _pic_to_software(pic: PicState, master: bool) -> PicChipState:
    r = pic.registers
    return PicChipState(irr=r["irr"], isr=r["isr"], imr=r["imr"], vector_base=r["irq_base"],
                        priority_base=r["priority_add"] & 7, init_state=min(r["init_state"], 3),
                        icw4_expected=bool(r["init4"]), single=False, level_mode=False, auto_eoi=bool(r["auto_eoi"]),
                        rotate_on_auto_eoi=bool(r["rotate_on_auto_eoi"]),
                        special_fully_nested=bool(r["special_fully_nested_mode"]),
                        special_mask=bool(r["special_mask"]), read_isr=bool(r["read_reg_select"]),
                        poll_pending=bool(r["poll"]), cascade_id=PIC_CASCADE_IR, elcr=r["elcr"],
                        line_levels=r["last_irr"])


def _pic_to_kvm(chip: PicChipState, master: bool) -> PicState:
    if chip.single or chip.level_mode:
        raise refuse("platform.pic", "the guest set the 8259 to single or level-triggered (LTIM) mode, "
                     "which KVM's in-kernel PIC does not model")
    return PicState(registers={
        "last_irr": chip.line_levels, "irr": chip.irr, "imr": chip.imr, "isr": chip.isr,
        "priority_add": chip.priority_base, "irq_base": chip.vector_base, "read_reg_select": int(chip.read_isr),
        "poll": int(chip.poll_pending), "special_mask": int(chip.special_mask), "init_state": chip.init_state,
        "auto_eoi": int(chip.auto_eoi), "rotate_on_auto_eoi": int(chip.rotate_on_auto_eoi),
        "special_fully_nested_mode": int(chip.special_fully_nested), "init4": int(chip.icw4_expected),
        "elcr": chip.elcr, "elcr_mask": PIC_ELCR_MASKS[0 if master else 1]})


# --- the 8254 -----------------------------------------------------------------------------------

def _pit_to_software(channel: PitChannelState, now_ns: int) -> PitCounterState:
    r = channel.registers
    gate = bool(r["gate"])
    access = r["rw_mode"] if 1 <= r["rw_mode"] <= 3 else ACCESS_LOHI
    latched = b""
    if r["count_latched"]:
        value = r["latched_count"]
        latched = {1: bytes([value & 0xFF]), 2: bytes([value >> 8 & 0xFF]),
                   3: bytes([value & 0xFF, value >> 8 & 0xFF])}.get(r["count_latched"], b"")
    common: dict[str, Any] = dict(gate=gate, access=access, bcd=bool(r["bcd"]), base_ns=now_ns, base_ticks=0,
                  write_msb_next=r["write_state"] == KVM_RW_WORD1, pending_lsb=r["write_latch"],
                  read_msb_next=r["read_state"] == KVM_RW_WORD1, latched_bytes=latched,
                  latched_status=r["status"] if r["status_latched"] else None)
    if r["mode"] > 5:   # never programmed
        return PitCounterState(mode=0, reload=0x10000, loaded=False, triggered=False, null_count=True,
                               next_edge_tick=None, **common)
    reload = min(max(r["count"], 1), 0x10000)
    waits_for_gate = r["mode"] in (1, 5)
    # KVM restarts the count on restore: so does this, from now
    return PitCounterState(mode=r["mode"], reload=reload, loaded=True, triggered=waits_for_gate and gate,
                           null_count=False, next_edge_tick=None if waits_for_gate and not gate else reload, **common)


def _pit_to_kvm(counter: PitCounterState) -> PitChannelState:
    latched_mode, latched_count = 0, 0
    if len(counter.latched_bytes) == 2:
        latched_mode, latched_count = 3, counter.latched_bytes[0] | counter.latched_bytes[1] << 8
    elif len(counter.latched_bytes) == 1:
        # one byte left: an LSB-only latch, or the MSB of a 16-bit one (or an MSB-only latch)
        latched_mode = 1 if counter.access == 1 else 2
        latched_count = counter.latched_bytes[0] << (0 if latched_mode == 1 else 8)
    return PitChannelState(registers={
        "count": counter.reload & 0xFFFF if counter.reload < 0x10000 else 0x10000,
        "latched_count": latched_count, "count_latched": latched_mode,
        "status_latched": int(counter.latched_status is not None), "status": counter.latched_status or 0,
        "read_state": KVM_RW_WORD1 if counter.read_msb_next else counter.access,
        "write_state": KVM_RW_WORD1 if counter.write_msb_next else counter.access,
        "write_latch": counter.pending_lsb, "rw_mode": counter.access,
        "mode": counter.mode if counter.loaded else KVM_PIT_MODE_UNPROGRAMMED,
        "bcd": int(counter.bcd), "gate": int(counter.gate)})


# --- the LAPIC: KVM's register page <-> the platform model ------------------------------------

def _reg(page: bytes, offset: int) -> int:
    return struct.unpack_from("<I", page, offset)[0]


def _wide(page: bytes, base: int) -> int:
    """ISR, TMR or IRR: eight 32-bit registers 16 bytes apart, as one 256-bit number."""
    return sum(_reg(page, base + 0x10 * i) << (32 * i) for i in range(8))


def _timer_divisor(divide: int) -> int:
    code = (divide & 3) | ((divide >> 1) & 4)
    return 1 << ((code + 1) & 7)


def lapic_to_software(page: bytes, apic_base: int, tsc_deadline: int, nmi_pending: bool, now_ns: int,
                      timer_hz: int) -> LapicState:
    lvt = tuple(_reg(page, offset) & (writable | 1 << 12) for offset, writable in zip(R.LVT_OFFSETS, R.LVT_WRITABLE))
    initial, current, divide = _reg(page, R.REG_TIMER_INITIAL), _reg(page, R.REG_TIMER_CURRENT), \
        _reg(page, R.REG_TIMER_DIVIDE) & 0xB
    mode = lvt[R.LVT_TIMER] >> 17 & 3
    ns_per = NS_PER_SECOND * _timer_divisor(divide)
    start_ns, next_ns = now_ns, None
    # A periodic count reads 0 between its expiry and KVM's re-arm: the period is over, due now
    # (a one-shot count at 0 has expired)
    if mode != R.TIMER_TSC_DEADLINE and initial and (current or mode == R.TIMER_PERIODIC):
        start_ns = now_ns - (initial - current) * ns_per // timer_hz
        next_ns = start_ns + -(-initial * ns_per // timer_hz)
    return LapicState(apic_id=_reg(page, R.REG_ID) >> 24, apic_base=apic_base, tpr=_reg(page, R.REG_TPR) & 0xFF,
                      ldr=_reg(page, R.REG_LDR) & 0xFF000000, dfr=_reg(page, R.REG_DFR) | 0x0FFFFFFF,
                      svr=_reg(page, R.REG_SVR) & R.SVR_WRITABLE, isr=_wide(page, R.REG_ISR),
                      irr=_wide(page, R.REG_IRR), tmr=_wide(page, R.REG_TMR), esr=_reg(page, R.REG_ESR) & 0xFF,
                      esr_pending=0, icr_low=_reg(page, R.REG_ICR_LOW) & R.ICR_LOW_WRITABLE,
                      icr_high=_reg(page, R.REG_ICR_HIGH) & 0xFF000000, lvt=lvt,  # type: ignore[arg-type]
                      timer_initial=initial, timer_divide=divide, timer_start_ns=max(start_ns, 0),
                      timer_next_ns=next_ns, tsc_deadline=tsc_deadline if mode == R.TIMER_TSC_DEADLINE else 0,
                      extint_requested=False, nmi_pending=nmi_pending, startup_events=())


def lapic_to_kvm(lapic: LapicState, now_ns: int, timer_hz: int) -> bytes:
    if lapic.startup_events:
        raise refuse("platform.lapics", f"LAPIC {lapic.apic_id} holds an INIT or startup IPI its vCPU has not taken")
    page = bytearray(1024)

    def put(offset: int, value: int) -> None:
        struct.pack_into("<I", page, offset, value & 0xFFFFFFFF)

    put(R.REG_ID, lapic.apic_id << 24)
    put(R.REG_VERSION, R.LAPIC_VERSION)
    for offset, name in ((R.REG_TPR, "tpr"), (R.REG_LDR, "ldr"), (R.REG_DFR, "dfr"), (R.REG_SVR, "svr"),
                         (R.REG_ESR, "esr"), (R.REG_ICR_LOW, "icr_low"), (R.REG_ICR_HIGH, "icr_high"),
                         (R.REG_TIMER_INITIAL, "timer_initial"), (R.REG_TIMER_DIVIDE, "timer_divide")):
        put(offset, getattr(lapic, name))
    for base, value in ((R.REG_ISR, lapic.isr), (R.REG_TMR, lapic.tmr), (R.REG_IRR, lapic.irr)):
        for i in range(8):
            put(base + 0x10 * i, value >> (32 * i))
    for offset, value in zip(R.LVT_OFFSETS, lapic.lvt):
        put(offset, value)
    mode = lapic.lvt[R.LVT_TIMER] >> 17 & 3
    current = 0
    if mode != R.TIMER_TSC_DEADLINE and lapic.timer_initial and lapic.timer_next_ns is not None:
        elapsed = max(0, now_ns - lapic.timer_start_ns) * timer_hz // (NS_PER_SECOND * _timer_divisor(lapic.timer_divide))
        current = (lapic.timer_initial - elapsed % lapic.timer_initial if mode == R.TIMER_PERIODIC
                   else max(0, lapic.timer_initial - elapsed))
    put(R.REG_TIMER_CURRENT, current)   # KVM_SET_LAPIC starts the timer from here
    return bytes(page)


# --- whole states -------------------------------------------------------------------------------

def to_software(platform: KvmVmState, vcpus: tuple[VcpuState, ...], view: GuestCpuView
                ) -> tuple[SoftwarePlatformState, tuple[VcpuState, ...]]:
    """KVM's VM-wide state and vCPUs -> the software CPU's platform and vCPUs."""
    now = platform.clock_ns
    lapics, converted = [], []
    for i, vcpu in enumerate(vcpus):
        for index in KVMCLOCK_MSRS:
            if vcpu.msrs.get(index, 0) & 1:
                raise refuse(f"vcpus[{i}].msrs[{index:#x}]", "the guest uses kvm-clock, which the software CPU does not have")
        if vcpu.lapic is None:
            raise refuse(f"vcpus[{i}].lapic", "a KVM vCPU state without its LAPIC page")
        events = vcpu.events
        lapics.append(lapic_to_software(vcpu.lapic, vcpu.apic_base, vcpu.msrs.get(M.MSR_IA32_TSC_DEADLINE, 0),
                                        events.nmi_pending, now, view.lapic_timer_hz))
        msrs = {k: v for k, v in vcpu.msrs.items()
                if k != M.MSR_IA32_TSC_DEADLINE and not (k == M.MSR_IA32_TSC_ADJUST and v == 0)}
        xsave = vcpu.xsave
        if xsave is not None and not xsave.components and not xsave.xcr0 & ~(XSTATE_X87 | XSTATE_SSE):
            xsave = None    # x87/SSE only: all of it is in the FPU state
        converted.append(dataclasses.replace(vcpu, lapic=None, msrs=msrs, xsave=xsave,
                                             events=dataclasses.replace(events, nmi_pending=False)))
    pit = PitState(counters=tuple(_pit_to_software(c, now) for c in platform.pit_channels),  # type: ignore[arg-type]
                   port61=PORT61_GATE2 if platform.pit_channels[2].registers["gate"] else 0)
    io = platform.ioapic
    state = SoftwarePlatformState(
        clock=ClockState(now_ns=now, tsc_hz=view.tsc_khz * 1000, paused=True),
        pic=PicPairState(master=_pic_to_software(platform.pic_master, True),
                         slave=_pic_to_software(platform.pic_slave, False)),
        pit=pit, ioapic=IoApicState(id=io.id & 0xF, select=io.ioregsel & 0xFF, asserted=io.irr,
                                    redirection=io.redirection),
        lapics=tuple(lapics))
    return state, tuple(converted)


def to_kvm(platform: SoftwarePlatformState, vcpus: tuple[VcpuState, ...], view: GuestCpuView
           ) -> tuple[KvmVmState, tuple[VcpuState, ...]]:
    """The software CPU's platform and vCPUs -> KVM's VM-wide state and vCPUs."""
    now = platform.clock.now_ns
    if len(platform.lapics) != len(vcpus):
        raise refuse("platform.lapics", f"{len(platform.lapics)} LAPICs for {len(vcpus)} vCPUs")
    converted = []
    for vcpu, lapic in zip(vcpus, platform.lapics):
        msrs = dict(vcpu.msrs)
        if lapic.lvt[R.LVT_TIMER] >> 17 & 3 == R.TIMER_TSC_DEADLINE:
            msrs[M.MSR_IA32_TSC_DEADLINE] = lapic.tsc_deadline
        events = dataclasses.replace(vcpu.events, nmi_pending=vcpu.events.nmi_pending or lapic.nmi_pending)
        converted.append(dataclasses.replace(vcpu, lapic=lapic_to_kvm(lapic, now, view.lapic_timer_hz), msrs=msrs,
                                             events=events))
    io = platform.ioapic
    channels = tuple(_pit_to_kvm(c) for c in platform.pit.counters)
    state = KvmVmState(pic_master=_pic_to_kvm(platform.pic.master, True), pic_slave=_pic_to_kvm(platform.pic.slave, False),
                       ioapic=IoapicState(base_address=layout.IOAPIC_BASE, ioregsel=io.select, id=io.id,
                                          irr=io.asserted & 0xFFFFFFFF, redirection=io.redirection),
                       pit_channels=channels, pit_flags=0, clock_ns=now)  # type: ignore[arg-type]
    return state, tuple(converted)


def across_accelerators(accelerator: str, platform, vcpus: tuple[VcpuState, ...], view: GuestCpuView | None,
                        destination, policy: CpuidPolicy) -> tuple[State, tuple[VcpuState, ...]]:
    """A state saved on `accelerator` made ready for `destination` (an accelerator instance,
    nothing built yet): the CPU the guest saw checked and kept (destination.keep_guest_view),
    the platform and vCPUs converted. One StateError line for what cannot be kept."""
    if view is None:
        raise refuse("guest_view", "the state does not record the CPU the guest saw (an older pyvmm saved it), "
                     f"so it can continue only on {accelerator}")
    check_cpuid(view.entries(), destination.offered_cpuid(policy, len(vcpus)),
                "KVM on this host" if destination.name == "kvm" else "the software CPU")
    destination.keep_guest_view(view)
    if accelerator == "kvm" and destination.name == "tcg":
        return to_software(require(platform, KvmVmState), vcpus, view)
    if accelerator == "tcg" and destination.name == "kvm":
        return to_kvm(require(platform, SoftwarePlatformState), vcpus, view)
    raise refuse("accelerator", f"saved on {accelerator}, cannot continue on {destination.name}")
