"""CPUID leaf 0x15 as Linux reads it: whatever the host's TSC rate, the guest derives that rate.

`linux_tsc_khz` and `linux_lapic_timer_period` re-implement `native_calibrate_tsc` (Linux 6.1,
arch/x86/kernel/tsc.c) with its 32-bit unsigned arithmetic, which is what wrapped at
2599.998 MHz when pyvmm announced a 1 GHz crystal."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.arch.x86_64.tsc_leaf import U32_MAX, TscLeaf, tsc_leaf

HZ = 250  # Debian's CONFIG_HZ; any HZ divides the same product


def u32(value: int) -> int:
    return value & U32_MAX


def linux_tsc_khz(leaf: TscLeaf) -> int:
    assert 0 < leaf.denominator <= U32_MAX and 0 < leaf.numerator <= U32_MAX and 0 <= leaf.crystal_hz <= U32_MAX
    crystal_khz = leaf.crystal_hz // 1000
    return u32(crystal_khz * leaf.numerator) // leaf.denominator


def linux_lapic_timer_period(leaf: TscLeaf) -> int:
    return u32(leaf.crystal_hz // 1000 * 1000) // HZ


ODD_RATES_KHZ = [2599998, 3192614, 1995379, 2100000, 1000001, 4294967, 4294968, 4324319, 4999999, 5000000,
                 39893335]  # no divisor up to 64: found by the property test below
COARSE_RATES_KHZ = list(range(1_000_000, 5_000_001, 1_237))  # every kHz-rounded step, ~3,200 rates


def assert_exact(khz: int) -> None:
    leaf = tsc_leaf(khz * 1000)
    assert linux_tsc_khz(leaf) == khz, leaf  # within 1 ppm: exact to the kHz
    # the LAPIC timer period Linux takes from the crystal is the crystal's, without wrapping
    assert linux_lapic_timer_period(leaf) * HZ == leaf.crystal_hz // 1000 * 1000


@pytest.mark.parametrize("khz", ODD_RATES_KHZ)
def test_odd_host_rates_reach_linux_exactly(khz):
    assert_exact(khz)


def test_a_sweep_of_host_rates_from_1_to_5_ghz_reaches_linux_exactly():
    for khz in COARSE_RATES_KHZ:
        assert_exact(khz)


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=100_000, max_value=40_000_000))
def test_any_rate_up_to_40_ghz_reaches_linux_exactly(khz):
    assert_exact(khz)


def test_the_old_announcement_was_wrong_at_2599998_khz():
    # 1 GHz crystal, reduced ratio: what pyvmm announced before, and what Linux made of it
    old = TscLeaf(denominator=500000, numerator=1299999, crystal_hz=1_000_000_000)
    assert linux_tsc_khz(old) == 5837


def test_rates_are_rounded_to_the_khz_linux_works_in():
    assert linux_tsc_khz(tsc_leaf(2_599_998_499)) == 2599998
    assert linux_tsc_khz(tsc_leaf(2_599_998_500)) == 2599999


@pytest.mark.parametrize("bad", [0, -1])
def test_a_non_positive_rate_is_refused(bad):
    with pytest.raises(ValueError, match="positive"):
        tsc_leaf(bad)


@pytest.mark.parametrize("khz", [2600000, 2100000, 3000000, 1995379, 2599998, 3192614])
def test_a_kvm_guests_leaf_keeps_kvms_1_ghz_lapic_crystal_or_stays_empty(khz):
    from pyvmm.arch.x86_64.cpuid import CpuidPolicy, kvm_guest_cpuid
    from pyvmm.kvm.system import CpuidEntry

    host = [CpuidEntry(0, 0, 0, 0x16, 0, 0, 0), CpuidEntry(0x15, 0, 0, 2, 216, 24_000_000, 0)]
    entry = next(e for e in kvm_guest_cpuid(host, CpuidPolicy(set()), 0, 1, khz) if e.function == 0x15)
    leaf = TscLeaf(entry.eax, entry.ebx, entry.ecx)
    if entry.ebx:  # announced: exact, with the 1 GHz crystal KVM's LAPIC timer counts at
        assert entry.ecx == 1_000_000_000 and linux_tsc_khz(leaf) == khz
    else:  # not expressible (2599998 kHz): Linux ignores the leaf and uses kvm-clock
        assert khz in (1995379, 2599998, 3192614)


def test_the_host_rate_comes_from_kvm_get_tsc_khz_unrounded(monkeypatch):
    from pyvmm.accel.tcg import host_tsc as machine

    class FakeVcpu:
        def get_tsc_khz(self):
            return 2599998

        def close(self):
            pass

    class FakeVm:
        def create_vcpu(self, index):
            return FakeVcpu()

        def close(self):
            pass

    class FakeKvm:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def create_vm(self):
            return FakeVm()

    import pyvmm.kvm
    monkeypatch.setattr(pyvmm.kvm, "Kvm", FakeKvm)
    machine.host_tsc_hz.cache_clear()
    try:
        assert machine.host_tsc_hz() == 2_599_998_000
        assert linux_tsc_khz(tsc_leaf(machine.host_tsc_hz())) == 2599998
    finally:
        machine.host_tsc_hz.cache_clear()


@pytest.mark.parametrize("tsc_hz, crystal_hz", [(2_599_998_000, 1_000_000_000), (3_192_614_321, 25_000_000),
                                                (1_000_000, 19_200_000), (4_294_967_000, 1_000_000_000)])
def test_a_fixed_crystal_leaf_is_the_rate_ratio_in_lowest_terms_or_none(tsc_hz, crystal_hz):
    from fractions import Fraction

    from pyvmm.arch.x86_64.tsc_leaf import fixed_crystal_tsc_leaf

    leaf = fixed_crystal_tsc_leaf(tsc_hz, crystal_hz)
    ratio = Fraction((tsc_hz + 500) // 1000, crystal_hz // 1000)
    if crystal_hz // 1000 * ratio.numerator > 0xFFFF_FFFF:
        assert leaf is None
    else:
        assert leaf == TscLeaf(ratio.denominator, ratio.numerator, crystal_hz)
        assert linux_tsc_khz(leaf) == (tsc_hz + 500) // 1000


def test_a_fixed_crystal_below_1_khz_is_refused():
    from pyvmm.arch.x86_64.tsc_leaf import fixed_crystal_tsc_leaf

    with pytest.raises(ValueError, match="below 1 kHz"):
        fixed_crystal_tsc_leaf(2_000_000_000, 999)
