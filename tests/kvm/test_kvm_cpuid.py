"""The CPUID guests see, read by a guest at CPL0 (guests/cpuid.S), and kvm-clock (guests/kvmclock.S).

On KVM the guest finds KVM's signature leaf and the paravirtual features pyvmm offers
(what KVM_GET_SUPPORTED_CPUID reports, minus what needs the VMM); the software CPU, which
implements none of those MSRs, shows no KVM leaves. Expected bits come from Linux's
KVM_FEATURE_* numbers (Documentation/virt/kvm/x86/cpuid.rst), not from pyvmm's tables.
"""

from __future__ import annotations

import pytest

from helpers.reporting import run_reporting
from pyvmm.accel.select import kvm_emulates_kernel_code
from pyvmm.kvm import Kvm

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
# KVM_FEATURE_* bits pyvmm passes through when KVM reports them: CLOCKSOURCE, NOP_IO_DELAY,
# CLOCKSOURCE2, ASYNC_PF, STEAL_TIME, PV_EOI, PV_UNHALT, PV_TLB_FLUSH, ASYNC_PF_VMEXIT,
# PV_SEND_IPI, POLL_CONTROL, PV_SCHED_YIELD, ASYNC_PF_INT, CLOCKSOURCE_STABLE_BIT
OFFERED = sum(1 << b for b in (0, 1, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 24))
KVMCLOCK_BITS = 1 << 0 | 1 << 3 | 1 << 24
CX16 = 1 << 13


def guest_cpuid(accel: str, hide: set[str] = frozenset()) -> dict[int, tuple[int, int, int, int]]:
    """leaf -> (EAX, EBX, ECX, EDX) as the guest read them."""
    outcome, reports, _ = run_reporting("cpuid.S", accel, 6, cpu_hide=frozenset(hide))
    assert outcome.reason == "debug-exit" and outcome.status == 1, outcome
    return {report[0]: report[2:] for report in reports}   # (leaf, subleaf, EAX, EBX, ECX, EDX)


def kvm_reported_features() -> int:
    with Kvm() as kvm:
        return next(e.eax for e in kvm.supported_cpuid() if e.function == 0x40000001)


def test_kvm_signature_and_paravirtual_features(accel):
    leaves = guest_cpuid(accel)
    eax, ebx, ecx, edx = leaves[0x40000000]
    signature = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
    if accel == "tcg":
        assert signature != KVM_SIGNATURE                # no KVM leaves on the software CPU
        return
    assert signature == KVM_SIGNATURE and eax == 0x40000001
    features = leaves[0x40000001]
    assert features[0] == kvm_reported_features() & OFFERED
    assert features[0] & KVMCLOCK_BITS                   # every KVM since 2.6.34 has kvm-clock
    assert features[1:] == (0, 0, 0)


def test_cpu_hide_kvmclock_reaches_the_guest():
    features = guest_cpuid("kvm", {"kvmclock"})[0x40000001][0]
    assert not features & KVMCLOCK_BITS
    assert features == kvm_reported_features() & OFFERED & ~KVMCLOCK_BITS


def test_cx16_hidden_where_kvm_cannot_emulate_cmpxchg16b():
    """cmpxchg16b fails at CPL0 on a KVM that emulates kernel code (accel/kvm/assist.py):
    pyvmm hides CX16 there, and only there. CX16 is a bit kvm_pvm does pass on from the
    CPUID pyvmm sets (the calibration says whether this host emulates kernel code)."""
    ecx = guest_cpuid("kvm")[1][2]
    with Kvm() as kvm:
        host_cx16 = next(e.ecx for e in kvm.supported_cpuid() if e.function == 1) & CX16
    if kvm_emulates_kernel_code():
        assert not ecx & CX16
    else:
        assert ecx & CX16 == host_cx16


def test_kvmclock_fills_in_the_pvclock_structure():
    outcome, reports, _ = run_reporting("kvmclock.S", "kvm", 4)
    assert outcome.reason == "debug-exit" and outcome.status == 1, outcome
    [(version, mul, shift_flags, _system_time)] = reports   # system_time is a time: not asserted
    assert version != 0 and version % 2 == 0     # even: KVM finished writing it
    assert mul != 0                              # tsc_to_system_mul: a usable TSC-to-ns scale
    shift = shift_flags & 0xFF
    assert shift >= 0x100 - 32 or shift <= 32    # tsc_shift, a signed byte


@pytest.mark.parametrize("hide", [{"kvm_pv_eoi", "kvm_steal_time"}])
def test_other_pv_features_can_be_hidden_one_by_one(hide):
    features = guest_cpuid("kvm", hide)[0x40000001][0]
    assert not features & (1 << 6 | 1 << 5)
    assert features == kvm_reported_features() & OFFERED & ~(1 << 6 | 1 << 5)
