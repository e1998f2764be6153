"""The local APIC's register page and MSR layout: offsets, bits, reset values (see lapic.py)."""

from __future__ import annotations

from typing import Final, Protocol

LAPIC_BASE: Final = 0xFEE00000
LAPIC_WINDOW: Final = 0x1000
LAPIC_VERSION: Final = 0x00050014  # integrated APIC version 0x14, max LVT entry 5 (six LVTs)
DEFAULT_TIMER_HZ: Final = 1_000_000_000

APIC_BASE_BSP: Final = 1 << 8
APIC_BASE_X2APIC: Final = 1 << 10
APIC_BASE_ENABLE: Final = 1 << 11
APIC_BASE_ADDRESS_MASK: Final = 0x000F_FFFF_FFFF_F000

# Register offsets.
REG_ID: Final = 0x020
REG_VERSION: Final = 0x030
REG_TPR: Final = 0x080
REG_APR: Final = 0x090
REG_PPR: Final = 0x0A0
REG_EOI: Final = 0x0B0
REG_RRD: Final = 0x0C0
REG_LDR: Final = 0x0D0
REG_DFR: Final = 0x0E0
REG_SVR: Final = 0x0F0
REG_ISR: Final = 0x100
REG_TMR: Final = 0x180
REG_IRR: Final = 0x200
REG_ESR: Final = 0x280
REG_ICR_LOW: Final = 0x300
REG_ICR_HIGH: Final = 0x310
REG_LVT_TIMER: Final = 0x320
REG_LVT_THERMAL: Final = 0x330
REG_LVT_PERF: Final = 0x340
REG_LVT_LINT0: Final = 0x350
REG_LVT_LINT1: Final = 0x360
REG_LVT_ERROR: Final = 0x370
REG_TIMER_INITIAL: Final = 0x380
REG_TIMER_CURRENT: Final = 0x390
REG_TIMER_DIVIDE: Final = 0x3E0

LVT_TIMER: Final = 0
LVT_THERMAL: Final = 1
LVT_PERF: Final = 2
LVT_LINT0: Final = 3
LVT_LINT1: Final = 4
LVT_ERROR: Final = 5
LVT_OFFSETS: Final = (REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_ERROR)
LVT_WRITABLE: Final = (0x000700FF, 0x000107FF, 0x000107FF, 0x0001A7FF, 0x0001A7FF, 0x000100FF)
LVT_MASKED: Final = 1 << 16
LVT_RESET: Final = LVT_MASKED

TIMER_ONESHOT: Final = 0
TIMER_PERIODIC: Final = 1
TIMER_TSC_DEADLINE: Final = 2

SVR_ENABLE: Final = 1 << 8
SVR_WRITABLE: Final = 0x3FF  # vector, enable, focus-check disable (no EOI-broadcast suppression)
SVR_RESET: Final = 0xFF

ICR_LOW_WRITABLE: Final = 0x000CCFFF
ICR_LOGICAL: Final = 1 << 11
ICR_ASSERT: Final = 1 << 14
ICR_LEVEL_TRIGGER: Final = 1 << 15

DFR_RESET: Final = 0xFFFFFFFF
DFR_FLAT: Final = 0xF

ESR_SEND_ILLEGAL_VECTOR: Final = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR: Final = 1 << 6


class PicOutput(Protocol):
    """What a LAPIC needs of the 8259 pair (`Pic8259Pair` has it)."""

    def interrupt_pending(self) -> bool: ...

    def pending_vector(self) -> int | None: ...

    def acknowledge(self) -> int: ...

