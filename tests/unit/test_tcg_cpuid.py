"""The CPUID of the software CPU: Unicorn's features, an in-order CPU's signature, pyvmm's brand."""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

from pyvmm.accel.tcg.cpuid import signature, tcg_cpuid_tables, translator_cpuid  # noqa: E402
from pyvmm.arch.x86_64.cpuid import CpuidPolicy  # noqa: E402


def _family_model_stepping(eax: int) -> tuple[int, int, int]:
    # the SDM's rule for family 6: display model = extended model << 4 | model
    return eax >> 8 & 0xF, (eax >> 16 & 0xF) << 4 | (eax >> 4 & 0xF), eax & 0xF


def _brand(table) -> str:
    raw = b"".join(r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
                   for r in table.lookup(leaf, 0))
    return raw.rstrip(b"\0").decode()


def test_the_guest_sees_an_in_order_atom_with_unicorns_features():
    table = tcg_cpuid_tables(CpuidPolicy(set()), 1)[0]
    eax, _, ecx, edx = table.lookup(1, 0)
    # family 6 model 0x1C: on Linux's list of CPUs not affected by speculative-execution flaws
    assert _family_model_stepping(eax) == (6, 0x1C, 10)
    assert _brand(table) == "pyvmm software CPU"
    unicorn_leaf1 = next(e for e in translator_cpuid() if e.function == 1)
    assert edx == unicorn_leaf1.edx  # the features are still what the translator implements
    assert ecx & ~(1 << 31) & ~unicorn_leaf1.ecx == 0  # nothing it lacks (bit 31: the hypervisor bit)


def test_signature_packs_the_extended_model():
    assert signature(6, 0x1C, 10) == 0x106CA
    assert _family_model_stepping(signature(6, 0x3C, 4)) == (6, 0x3C, 4)


@pytest.mark.parametrize("tsc_hz", [2_599_998_000, 3_192_614_000, 4_999_999_000])
def test_leaf_0x15_and_the_lapic_timer_agree_on_the_crystal(tsc_hz):
    from pyvmm.platform.machine import SoftwarePlatform
    from pyvmm.arch.x86_64.tsc_leaf import tsc_leaf

    platform = SoftwarePlatform(lambda: None, tsc_hz=tsc_hz, lapic_timer_hz=tsc_leaf(tsc_hz).crystal_hz)
    lapic = platform.add_cpu(0)
    table = tcg_cpuid_tables(CpuidPolicy(set()), 1, tsc_hz)[0]
    eax, ebx, ecx, _ = table.lookup(0x15, 0)
    leaf = tsc_leaf(tsc_hz)
    assert (eax, ebx, ecx) == (leaf.denominator, leaf.numerator, leaf.crystal_hz)
    assert lapic.timer_hz == ecx  # Linux programs the LAPIC timer at the announced crystal
    assert table.lookup(0, 0)[0] >= 0x15
