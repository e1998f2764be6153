"""How the software CPU announces its TSC rate in CPUID leaf 0x15, so Linux derives it exactly.

Leaf 0x15 says: TSC rate = crystal (ECX, Hz) * EBX / EAX. Linux (`native_calibrate_tsc`)
evaluates that in 32-bit unsigned arithmetic, in kHz:

    crystal_khz = ECX / 1000
    tsc_khz     = (u32)(crystal_khz * EBX) / EAX
    lapic_timer_period = (u32)(crystal_khz * 1000) / HZ      # the LAPIC timer runs on the crystal

so any crystal * EBX beyond 2^32 wraps. A 1 GHz crystal with the reduced ratio of the TSC rate
only worked where that ratio had a small numerator (2.1 GHz -> 21/10); at 2599.998 MHz it is
1299999/500000 and the guest computed 5.837 MHz. Here the crystal is the TSC itself (EAX = EBX
= 1) whenever its rate in Hz fits ECX, and otherwise the smallest ratio whose crystal does; the
LAPIC timer model must count at `crystal_hz`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

U32_MAX = 0xFFFF_FFFF
NUMERATORS_PER_DENOMINATOR = 64  # searched above the smallest ratio, for a TSC beyond 4.29 GHz


@dataclass(frozen=True)
class TscLeaf:
    """CPUID leaf 0x15: EAX (denominator), EBX (numerator), ECX (crystal in Hz)."""
    denominator: int
    numerator: int
    crystal_hz: int


def tsc_leaf(tsc_hz: int) -> TscLeaf:
    """The leaf 0x15 from which Linux's 32-bit arithmetic derives `tsc_hz` rounded to a kHz."""
    if tsc_hz <= 0:
        raise ValueError(f"TSC rate must be positive, got {tsc_hz} Hz")
    khz = (tsc_hz + 500) // 1000
    if khz * 1000 <= U32_MAX:
        return TscLeaf(1, 1, khz * 1000)
    # crystal_khz * numerator ~ khz * denominator must fit 32 bits; the rounding up of the
    # crystal must cost less than a kHz, which some numerator close above the smallest ratio
    # gives (a ratio of small terms alone cannot: 39893335 kHz has no divisor up to 64)
    for denominator in range(1, U32_MAX // khz + 1):
        lowest = max(denominator + 1, -(-khz * denominator // (U32_MAX // 1000)))
        for numerator in range(lowest, lowest + NUMERATORS_PER_DENOMINATOR):
            crystal_khz = -(-khz * denominator // numerator)
            if (crystal_khz * 1000 <= U32_MAX and crystal_khz * numerator <= U32_MAX
                    and crystal_khz * numerator // denominator == khz):
                return TscLeaf(denominator, numerator, crystal_khz * 1000)
    raise ValueError(f"TSC rate {tsc_hz} Hz cannot be announced in CPUID leaf 0x15")


KVM_APIC_BUS_HZ = 1_000_000_000  # KVM's in-kernel LAPIC timer counts at 1 GHz, whatever the TSC


def fixed_crystal_tsc_leaf(tsc_hz: int, crystal_hz: int = KVM_APIC_BUS_HZ) -> TscLeaf | None:
    """Leaf 0x15 for a LAPIC timer whose rate is fixed (KVM's), or None where Linux's 32-bit
    arithmetic cannot be given the TSC rate with that crystal: the leaf must then stay empty
    (Linux falls back to kvm-clock or calibration), since a wrong crystal mis-rates the timer."""
    khz, crystal_khz = (tsc_hz + 500) // 1000, crystal_hz // 1000
    if crystal_khz <= 0:
        raise ValueError(f"crystal rate {crystal_hz} Hz is below 1 kHz")
    common = math.gcd(khz, crystal_khz)  # the ratio in lowest terms (math, not fractions: its import costs start-up)
    numerator, denominator = khz // common, crystal_khz // common
    if crystal_khz * numerator > U32_MAX or crystal_hz > U32_MAX:
        return None
    return TscLeaf(denominator, numerator, crystal_hz)
