"""Local APIC (xAPIC mode), one per vCPU: the 4 KiB register page at IA32_APIC_BASE.

Register page (offsets; each register is 32 bits at a 16-byte aligned offset):

    020 ID          030 version      080 TPR     090 APR     0A0 PPR     0B0 EOI
    0D0 LDR         0E0 DFR          0F0 SVR     100-170 ISR 180-1F0 TMR 200-270 IRR
    280 ESR         300/310 ICR low/high          320 LVT timer  330 thermal  340 perf
    350 LVT LINT0   360 LVT LINT1    370 LVT error  380 initial count  390 current count
    3E0 divide configuration

Interrupt acceptance follows the SDM: a fixed interrupt waits in IRR and is delivered when
its priority class (vector >> 4) is above the class of PPR, where PPR is the higher of TPR
and the class of the highest in-service vector. EOI retires the highest ISR bit; if that
vector was level-triggered (TMR bit) the EOI is broadcast to the IOAPIC on the APIC bus.

The 8259 output reaches the CPU through this LAPIC ("virtual wire"): when LINT0 is unmasked
with ExtINT delivery, when the IOAPIC sends an ExtINT message, and -- as the PIC's INTR
pin is wired past a disabled APIC -- when this LAPIC is hardware- or software-disabled.
Only the BSP's LAPIC should be given the PIC. ExtINT takes precedence over IRR (it bypasses
priority, as on hardware).

Timer (lapic_timer.py): counts down at `timer_hz` (the bus clock, default 1 GHz) divided by
the divide configuration. TSC-deadline mode compares against the guest TSC, which this model
derives from guest time at `tsc_hz`, TSC 0 at guest time 0 (the same formula as
`clock.VirtualClock`); construct with the clock's `tsc_hz`. Missed periodic expiries are
coalesced: `poll` delivers at most one per call. Registers and bits: lapic_registers.py;
the saved state: lapic_state.py.

Threads: every public method takes the APIC bus lock (shared with the IOAPIC). Messages can
arrive from any thread (a device raising an IOAPIC pin); `on_wakeup`, if set, is called
after the lock is released whenever something was accepted that the CPU should act on
(IRR vector, NMI, INIT/SIPI, ExtINT request).
"""

from __future__ import annotations

import logging
from typing import Callable

from .apic_bus import ApicBus, DeliveryMode
from .clock import DEFAULT_TSC_HZ
from .lapic_registers import (  # re-exported: tests and callers name them through lapic
    APIC_BASE_ADDRESS_MASK, APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_BASE_X2APIC, DEFAULT_TIMER_HZ, DFR_FLAT,
    DFR_RESET, ESR_RECEIVE_ILLEGAL_VECTOR, ESR_SEND_ILLEGAL_VECTOR, ICR_ASSERT, ICR_LEVEL_TRIGGER,
    ICR_LOGICAL, ICR_LOW_WRITABLE, LAPIC_BASE, LAPIC_VERSION, LAPIC_WINDOW, LVT_ERROR, LVT_LINT0, LVT_LINT1,
    LVT_MASKED, LVT_OFFSETS, LVT_PERF, LVT_RESET, LVT_THERMAL, LVT_TIMER, LVT_WRITABLE, PicOutput, REG_APR,
    REG_DFR, REG_EOI, REG_ESR, REG_ICR_HIGH, REG_ICR_LOW, REG_ID, REG_IRR, REG_ISR, REG_LDR, REG_LVT_ERROR,
    REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_PERF, REG_LVT_THERMAL, REG_LVT_TIMER, REG_PPR, REG_RRD, REG_SVR,
    REG_TIMER_CURRENT, REG_TIMER_DIVIDE, REG_TIMER_INITIAL, REG_TMR, REG_TPR, REG_VERSION, SVR_ENABLE,
    SVR_RESET, SVR_WRITABLE, TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE,
)
from .lapic_persist import LapicPersist
from .lapic_state import LapicState
from .lapic_timer import LapicTimer

log = logging.getLogger(__name__)

def _highest_bit(mask: int) -> int | None:
    return mask.bit_length() - 1 if mask else None


class LocalApic(LapicTimer, LapicPersist):
    def __init__(self, apic_id: int, clock: Callable[[], int], bus: ApicBus, *,
                 pic: PicOutput | None = None, bsp: bool | None = None,
                 tsc_hz: int = DEFAULT_TSC_HZ, timer_hz: int = DEFAULT_TIMER_HZ) -> None:
        if not 0 <= apic_id < 0xFF:
            raise ValueError(f"lapic: APIC ID {apic_id} out of range (0-254 in xAPIC mode)")
        self.initial_apic_id = apic_id
        self._clock = clock
        self._bus = bus
        self._lock = bus.lock
        self.pic = pic
        self.tsc_hz = tsc_hz
        self.timer_hz = timer_hz
        self.on_wakeup: Callable[[], None] | None = None
        is_bsp = apic_id == 0 if bsp is None else bsp
        self._apic_base = LAPIC_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if is_bsp else 0)
        self._nmi_pending = False
        self._startup_events: list[tuple] = []
        self._power_on_registers()
        bus.attach_lapic(self)

    def _power_on_registers(self) -> None:
        """Register state after power-on or INIT (APIC ID and APIC base are kept by INIT)."""
        self._id = self.initial_apic_id
        self._tpr = 0
        self._ldr = 0
        self._dfr = DFR_RESET
        self._svr = SVR_RESET
        self._isr = 0
        self._irr = 0
        self._tmr = 0
        self._esr = 0
        self._esr_pending = 0
        self._icr_low = 0
        self._icr_high = 0
        self._lvt = [LVT_RESET] * 6
        self._timer_initial = 0
        self._timer_divide = 0
        self._timer_start_ns = 0
        self._timer_next_ns: int | None = None  # next one-shot/periodic expiry
        self._tsc_deadline = 0
        self._extint_requested = False

    # --- state queries used by the APIC bus (bus lock held) -----------------------------------

    @property
    def apic_id(self) -> int:
        """The ID register's current value (the guest may rewrite it)."""
        return self._id

    @property
    def hardware_enabled(self) -> bool:
        return bool(self._apic_base & APIC_BASE_ENABLE)

    @property
    def software_enabled(self) -> bool:
        return bool(self._svr & SVR_ENABLE)

    def matches_logical(self, destination: int) -> bool:
        logical_id = self._ldr >> 24
        if self._dfr >> 28 == DFR_FLAT:
            return bool(logical_id & destination)
        cluster = destination >> 4
        return (cluster == 0xF or cluster == logical_id >> 4) and bool(destination & logical_id & 0xF)

    # --- IA32_APIC_BASE and IA32_TSC_DEADLINE MSRs ------------------------------------------

    @property
    def apic_base(self) -> int:
        """IA32_APIC_BASE: base address | enable (bit 11) | BSP (bit 8)."""
        with self._lock:
            return self._apic_base

    @property
    def base_address(self) -> int:
        with self._lock:
            return self._apic_base & APIC_BASE_ADDRESS_MASK

    def write_apic_base(self, value: int) -> None:
        """WRMSR IA32_APIC_BASE. Clearing the enable bit resets the LAPIC (as hardware does);
        x2APIC mode is not offered and its bit is ignored."""
        with self._lock:
            if value & APIC_BASE_X2APIC:
                log.info("lapic %d: x2APIC enable requested; not supported, ignored", self.initial_apic_id)
            was_enabled = self.hardware_enabled
            self._apic_base = (value & (APIC_BASE_ADDRESS_MASK | APIC_BASE_ENABLE)) | (self._apic_base & APIC_BASE_BSP)
            if was_enabled and not self.hardware_enabled:
                log.debug("lapic %d: hardware-disabled", self.initial_apic_id)
                self._power_on_registers()
            elif self.base_address != LAPIC_BASE:
                log.info("lapic %d: relocated to %#x", self.initial_apic_id, self.base_address)

    def write_tsc_deadline(self, tsc: int) -> None:
        """WRMSR IA32_TSC_DEADLINE: arm (0 disarms); ignored unless the timer is in TSC-deadline mode."""
        with self._lock:
            if self._timer_mode() == TIMER_TSC_DEADLINE:
                self._tsc_deadline = tsc & 0xFFFF_FFFF_FFFF_FFFF

    def read_tsc_deadline(self) -> int:
        with self._lock:
            return self._tsc_deadline if self._timer_mode() == TIMER_TSC_DEADLINE else 0

    # --- MMIO register page -----------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            out = bytearray()
            position = offset
            while len(out) < size:
                dword_offset = position & ~3
                chunk = min(size - len(out), dword_offset + 4 - position)
                value = self._read_register(dword_offset) if self.hardware_enabled else 0
                out += value.to_bytes(4, "little")[position - dword_offset:position - dword_offset + chunk]
                position += chunk
            return bytes(out)

    def read_dword(self, offset: int) -> int:
        """read(offset, 4) of a dword-aligned offset, as an integer."""
        with self._lock:
            return self._read_register(offset) if self._apic_base & APIC_BASE_ENABLE else 0

    def write_dword(self, offset: int, value: int) -> None:
        """write() of a dword-aligned 32-bit `value` (each EOI: no bytes to split and join)."""
        with self._lock:
            if self._apic_base & APIC_BASE_ENABLE:
                self._write_register(offset, value & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if not self.hardware_enabled:
                return
            position = offset
            remaining = memoryview(data)
            while remaining:
                dword_offset = position & ~3
                start = position - dword_offset
                chunk = min(len(remaining), 4 - start)
                if chunk == 4:
                    value = int.from_bytes(remaining[:4], "little")
                else:
                    # A partial write merges into the register (the SDM leaves it undefined).
                    current = bytearray(self._read_register(dword_offset).to_bytes(4, "little"))
                    current[start:start + chunk] = remaining[:chunk]
                    value = int.from_bytes(current, "little")
                self._write_register(dword_offset, value)
                remaining = remaining[chunk:]
                position += chunk

    def _read_register(self, offset: int) -> int:
        if offset & 0xF:
            return 0  # only the first dword of each 16-byte slot is a register
        if offset == REG_ID:
            return self._id << 24
        if offset == REG_VERSION:
            return LAPIC_VERSION
        if offset == REG_TPR:
            return self._tpr
        if offset in (REG_APR, REG_PPR):
            return self._ppr()
        if offset == REG_LDR:
            return self._ldr
        if offset == REG_DFR:
            return self._dfr
        if offset == REG_SVR:
            return self._svr
        if REG_ISR <= offset < REG_ISR + 0x80:
            return self._isr >> (32 * ((offset - REG_ISR) >> 4)) & 0xFFFFFFFF
        if REG_TMR <= offset < REG_TMR + 0x80:
            return self._tmr >> (32 * ((offset - REG_TMR) >> 4)) & 0xFFFFFFFF
        if REG_IRR <= offset < REG_IRR + 0x80:
            return self._irr >> (32 * ((offset - REG_IRR) >> 4)) & 0xFFFFFFFF
        if offset == REG_ESR:
            return self._esr
        if offset == REG_ICR_LOW:
            return self._icr_low  # delivery status always idle: messages are delivered at once
        if offset == REG_ICR_HIGH:
            return self._icr_high
        if offset in LVT_OFFSETS:
            return self._lvt[LVT_OFFSETS.index(offset)]
        if offset == REG_TIMER_INITIAL:
            return self._timer_initial
        if offset == REG_TIMER_CURRENT:
            return self._timer_current(self._clock())
        if offset == REG_TIMER_DIVIDE:
            return self._timer_divide
        return 0  # EOI, RRD and reserved registers read as zero

    def _write_register(self, offset: int, value: int) -> None:
        if offset & 0xF:
            return
        if offset == REG_ID:
            self._id = value >> 24
        elif offset == REG_TPR:
            self._tpr = value & 0xFF
            self._wake_if_deliverable()
        elif offset == REG_EOI:
            self._eoi()
            self._wake_if_deliverable()
        elif offset == REG_LDR:
            self._ldr = value & 0xFF000000
        elif offset == REG_DFR:
            self._dfr = value | 0x0FFFFFFF
        elif offset == REG_SVR:
            self._write_svr(value)
        elif offset == REG_ESR:
            self._esr, self._esr_pending = self._esr_pending, 0
        elif offset == REG_ICR_LOW:
            self._icr_low = value & ICR_LOW_WRITABLE
            self._send_ipi()
        elif offset == REG_ICR_HIGH:
            self._icr_high = value & 0xFF000000
        elif offset in LVT_OFFSETS:
            self._write_lvt(LVT_OFFSETS.index(offset), value)
        elif offset == REG_TIMER_INITIAL:
            self._write_timer_initial(value)
        elif offset == REG_TIMER_DIVIDE:
            self._write_timer_divide(value)
        # Version, APR, PPR, ISR, TMR, IRR and current count are read-only.

    def _write_svr(self, value: int) -> None:
        was_enabled = self.software_enabled
        self._svr = value & SVR_WRITABLE
        if was_enabled and not self.software_enabled:
            # Software disable sets every LVT mask bit.
            self._lvt = [lvt | LVT_MASKED for lvt in self._lvt]
        if was_enabled != self.software_enabled:
            log.debug("lapic %d: software %s", self.initial_apic_id, "enabled" if self.software_enabled else "disabled")

    def _write_lvt(self, index: int, value: int) -> None:
        value &= LVT_WRITABLE[index]
        if not self.software_enabled:
            value |= LVT_MASKED  # mask bits cannot be cleared while software-disabled
        if index == LVT_TIMER:
            now = self._clock()
            self._timer_update(now)  # expiries before this write happen under the old settings
            old_mode = self._timer_mode()
            if (value >> 17) & 3 == 3:
                value &= ~(1 << 18)  # mode 3 is reserved: treat as one-shot/periodic bit only
            self._lvt[index] = value
            new_mode = self._timer_mode()
            if old_mode != new_mode and TIMER_TSC_DEADLINE in (old_mode, new_mode):
                # Switching to or from TSC-deadline mode disarms the timer.
                self._timer_initial = 0
                self._timer_next_ns = None
                self._tsc_deadline = 0
            return
        self._lvt[index] = value

    # --- priorities -------------------------------------------------------------------------

    def _ppr(self) -> int:
        isrv = _highest_bit(self._isr) or 0
        if (self._tpr >> 4) >= (isrv >> 4):
            return self._tpr
        return isrv & 0xF0

    def _deliverable_irr_vector(self) -> int | None:
        irr = self._irr
        if not irr or not self._apic_base & APIC_BASE_ENABLE or not self._svr & SVR_ENABLE:
            return None  # (held in IRR until the APIC is enabled)
        vector = irr.bit_length() - 1
        return vector if (vector >> 4) > (self._ppr() >> 4) else None

    def _extint_route(self) -> bool:
        """Is the PIC's INTR reaching the CPU through (or past) this LAPIC?"""
        if self.pic is None:
            return False
        if not self._apic_base & APIC_BASE_ENABLE or not self._svr & SVR_ENABLE or self._extint_requested:
            return True
        lint0 = self._lvt[LVT_LINT0]
        return not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == DeliveryMode.EXTINT

    # --- CPU side: interrupt acceptance -------------------------------------------------------

    def pending_vector(self, now_ns: int | None = None) -> int | None:
        """The vector an interrupt acknowledge would deliver now, or None. With `now_ns`, the
        timer is polled first. The PIC can change under a racing device thread: deliver what
        `acknowledge()` returns, not this."""
        # Without a timer poll nothing here defers a wake-up: the bus's lock itself will do
        # (PlatformLock's own frames were a tenth of the Python calls between two slices).
        with self._lock if now_ns is not None else self._lock.raw:
            if now_ns is not None:
                self._timer_update(now_ns)
            return self._pending_vector_locked()

    # The PIC is asked before the route is worked out: with the IOAPIC in use the PIC has nothing,
    # and its look costs less than the route's (both are asked at every interrupt, several times).

    def _pending_vector_locked(self) -> int | None:
        pic = self.pic
        if pic is not None:
            vector = pic.pending_vector()
            if vector is not None and self._extint_route():
                return vector
        return self._deliverable_irr_vector()

    def interrupt_pending(self) -> bool:
        return self.pending_vector() is not None

    def acknowledge(self) -> int:
        """The INTA cycle: the vector for the CPU to deliver through the IDT. A fixed vector
        moves from IRR to ISR; an ExtINT vector comes from the PIC's INTA. If nothing is
        deliverable any more, returns the spurious vector (SVR) without touching ISR."""
        with self._lock:
            vector = self._take_locked()
            if vector is not None:
                return vector
            pic = self.pic
            if pic is not None and self._extint_route():
                self._extint_requested = False
                return pic.acknowledge()  # the PIC answers a vanished request with IR7
            return self._svr & 0xFF

    def acknowledge_if_pending(self) -> tuple[int | None, bool]:
        """The INTA cycle only if an interrupt is deliverable now: (its vector, whether another is
        deliverable after it), or (None, False) with nothing touched. One lock for what the
        engine asks where an interrupt window opens (pending_vector, acknowledge, pending_vector)."""
        with self._lock.raw:  # (nothing here defers a wake-up)
            vector = self._take_locked()
            if vector is None:
                return None, False
            return vector, self._pending_vector_locked() is not None

    def _take_locked(self) -> int | None:
        """acknowledge() of what is deliverable now; None, with nothing touched, if nothing is."""
        pic = self.pic
        if pic is not None and pic.pending_vector() is not None and self._extint_route():
            self._extint_requested = False
            return pic.acknowledge()
        vector = self._deliverable_irr_vector()
        if vector is not None:
            bit = 1 << vector
            self._irr &= ~bit
            self._isr |= bit
        return vector

    @property
    def nmi_pending(self) -> bool:
        """A look, as the CPU loop takes between slices: take_nmi() decides."""
        return self._nmi_pending

    def take_nmi(self) -> bool:
        """Consume a pending NMI; True if there was one."""
        with self._lock:
            pending, self._nmi_pending = self._nmi_pending, False
            return pending

    def take_startup_events(self) -> list[tuple]:
        """INIT/SIPI received since the last call, oldest first: ("init",) / ("sipi", vector).
        INIT has already reset this LAPIC's registers; the CPU resets itself and waits for SIPI
        (and must ignore a SIPI unless it is waiting for one)."""
        with self._lock:
            events, self._startup_events = self._startup_events, []
            return events

    def has_startup_events(self) -> bool:
        """A look, as the CPU loop takes between slices: take_startup_events() decides."""
        return bool(self._startup_events)

    def has_pending_events(self) -> bool:
        """Anything that ends HLT: a deliverable interrupt, an NMI, INIT or SIPI. (The CPU
        still decides whether IF allows the interrupt.)"""
        with self._lock:
            return self._nmi_pending or bool(self._startup_events) or self.pending_vector() is not None

    # --- messages from the APIC bus (bus lock held) ------------------------------------------

    def receive_message(self, vector: int, delivery_mode: int, level_triggered: bool) -> None:
        if delivery_mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY):
            self._accept_vector(vector, level_triggered)
            return
        if delivery_mode == DeliveryMode.NMI:
            self._nmi_pending = True
        elif delivery_mode == DeliveryMode.INIT:
            log.debug("lapic %d: INIT", self.initial_apic_id)
            self._power_on_registers()
            self._nmi_pending = False
            self._startup_events.append(("init",))
        elif delivery_mode == DeliveryMode.STARTUP:
            log.debug("lapic %d: SIPI vector %#04x", self.initial_apic_id, vector & 0xFF)
            self._startup_events.append(("sipi", vector & 0xFF))
        elif delivery_mode == DeliveryMode.EXTINT:
            self._extint_requested = True
        else:
            log.info("lapic %d: delivery mode %d (SMI) not supported, dropped", self.initial_apic_id, delivery_mode)
            return
        self._lock.defer(self.on_wakeup)

    def _accept_vector(self, vector: int, level_triggered: bool) -> None:
        if vector < 16:
            self._record_error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return
        bit = 1 << vector
        already_pending = self._irr & bit
        self._irr |= bit
        if level_triggered:
            self._tmr |= bit
        else:
            self._tmr &= ~bit
        # Already pending: the CPU loop was told. (A serial port re-raises its interrupt at every
        # byte it sends; waking the loop each time ended a software-CPU slice per byte.)
        if not already_pending:
            self._lock.defer(self.on_wakeup)

    def _record_error(self, bit: int) -> None:
        self._esr_pending |= bit
        lvt = self._lvt[LVT_ERROR]
        if not lvt & LVT_MASKED and (lvt & 0xFF) >= 16:
            self._accept_vector(lvt & 0xFF, False)

    # --- EOI and IPIs -----------------------------------------------------------------------

    def _eoi(self) -> None:
        vector = _highest_bit(self._isr)
        if vector is None:
            return
        bit = 1 << vector
        self._isr &= ~bit
        if self._tmr & bit:
            self._bus.broadcast_eoi(vector)  # re-delivery may set IRR on this very LAPIC

    def _wake_if_deliverable(self) -> None:
        """An EOI or a lower TPR can let an interrupt held in IRR through: tell the CPU loop, as
        for a newly accepted one, so that it is taken as soon as IF allows. Otherwise it waits
        until something else ends the CPU's time slice, and the timer interrupt, due again by
        then and higher in priority, wins every time: a lower vector (the serial port's) starved."""
        if self._deliverable_irr_vector() is not None:
            self._lock.defer(self.on_wakeup)

    def _send_ipi(self) -> None:
        low = self._icr_low
        vector = low & 0xFF
        mode = (low >> 8) & 7
        logical = bool(low & ICR_LOGICAL)
        level_triggered = bool(low & ICR_LEVEL_TRIGGER)
        shorthand = (low >> 18) & 3
        destination = self._icr_high >> 24
        if mode == DeliveryMode.INIT and level_triggered and not low & ICR_ASSERT:
            log.debug("lapic %d: INIT level de-assert (no effect)", self.initial_apic_id)
            return
        if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY) and vector < 16:
            self._record_error(ESR_SEND_ILLEGAL_VECTOR)
            return
        if mode == DeliveryMode.EXTINT:
            log.info("lapic %d: ExtINT IPI is not valid, dropped", self.initial_apic_id)
            return
        self._bus.deliver(vector, mode, destination, logical, level_triggered=level_triggered and mode == DeliveryMode.FIXED,
                          shorthand=shorthand, source=self)

    def send_ipi(self, icr: int) -> None:
        """Send an IPI as a 64-bit ICR value (high dword = destination), as an x2APIC-style shortcut for tests."""
        with self._lock:
            self._icr_high = (icr >> 32) & 0xFF000000
            self._icr_low = icr & ICR_LOW_WRITABLE
            self._send_ipi()


    def apply_firmware_defaults(self) -> None:
        """What a PC BIOS leaves behind (and Firecracker sets for KVM): LINT0 = ExtINT and
        LINT1 = NMI, both unmasked, so the boot CPU keeps the 8259 virtual wire when Linux
        enables its LAPIC. Call once per LAPIC before the guest runs (direct kernel boot)."""
        with self._lock:
            self._lvt[LVT_LINT0] = DeliveryMode.EXTINT << 8
            self._lvt[LVT_LINT1] = DeliveryMode.NMI << 8

    # --- inspection and lifecycle -----------------------------------------------------------

    @property
    def irr(self) -> int:
        with self._lock:
            return self._irr

    @property
    def isr(self) -> int:
        with self._lock:
            return self._isr

    @property
    def tmr(self) -> int:
        with self._lock:
            return self._tmr

    @property
    def ppr(self) -> int:
        with self._lock:
            return self._ppr()

    def reset(self) -> None:
        """Machine reset: power-on state, APIC base back to default."""
        with self._lock:
            self._apic_base = LAPIC_BASE | APIC_BASE_ENABLE | (self._apic_base & APIC_BASE_BSP)
            self._nmi_pending = False
            self._startup_events = []
            self._power_on_registers()
