"""The local APIC's saved state (its save/restore: lapic_persist.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..persist import State
from .lapic_registers import ICR_LOW_WRITABLE, LVT_WRITABLE, SVR_WRITABLE

U256 = (1 << 256) - 1


@dataclass(frozen=True)
class LapicState(State):
    """Every register (ISR, IRR and TMR as 256-bit numbers), the timer's guest-time base and
    next expiry, the TSC deadline, and the events the CPU has not taken yet (ExtINT request,
    NMI, INIT/SIPI)."""
    KIND = "lapic"
    apic_id: int
    apic_base: int
    tpr: int
    ldr: int
    dfr: int
    svr: int
    isr: int
    irr: int
    tmr: int
    esr: int
    esr_pending: int
    icr_low: int
    icr_high: int
    lvt: tuple[int, int, int, int, int, int]
    timer_initial: int
    timer_divide: int
    timer_start_ns: int
    timer_next_ns: int | None
    tsc_deadline: int
    extint_requested: bool
    nmi_pending: bool
    startup_events: tuple[tuple[str, int], ...]   # ("init", 0) or ("sipi", vector)

    def validate(self) -> None:
        self.check_range("apic_id", 0, 0xFF)
        self.check_range("apic_base", 0, (1 << 64) - 1)
        self.check_range("tpr", 0, 0xFF)
        self.check_mask("ldr", 0xFF000000)
        if self.dfr & 0x0FFFFFFF != 0x0FFFFFFF or not 0 <= self.dfr <= 0xFFFFFFFF:
            self.fail("dfr", f"{self.dfr:#x}: bits 0-27 read as ones")
        self.check_mask("svr", SVR_WRITABLE)
        for name in ("isr", "irr", "tmr"):
            self.check_range(name, 0, U256)
        self.check_range("esr", 0, 0xFF)
        self.check_range("esr_pending", 0, 0xFF)
        self.check_mask("icr_low", ICR_LOW_WRITABLE)
        self.check_mask("icr_high", 0xFF000000)
        for i, (value, writable) in enumerate(zip(self.lvt, LVT_WRITABLE)):
            if value < 0 or value & ~(writable | 1 << 12):   # bit 12: delivery status, read-only
                self.fail(f"lvt[{i}]", f"{value:#x} has bits outside {writable:#x}")
        self.check_range("timer_initial", 0, 0xFFFFFFFF)
        self.check_mask("timer_divide", 0xB)
        self.check_range("tsc_deadline", 0, (1 << 64) - 1)
        for i, (kind, vector) in enumerate(self.startup_events):
            if kind not in ("init", "sipi") or not 0 <= vector <= 0xFF:
                self.fail(f"startup_events[{i}]", f"({kind!r}, {vector}) is not an INIT or a SIPI vector")


# The registers saved under their own names (LapicPersist saves each from `_<name>`).
SAVED_REGISTERS: Final = ("tpr", "ldr", "dfr", "svr", "isr", "irr", "tmr", "esr", "esr_pending", "icr_low", "icr_high",
              "timer_initial", "timer_divide", "timer_start_ns", "timer_next_ns", "tsc_deadline",
              "extint_requested", "nmi_pending")
