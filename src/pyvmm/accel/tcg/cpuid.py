"""The CPUID a software-CPU guest sees: only what the translator really implements.

The starting point is Unicorn's own CPUID for its CPU model, read by executing
CPUID on a scratch instance (QEMU's TCG reports only features it emulates).
Then the common policy applies (hidden features, hypervisor bit, per-vCPU APIC
IDs and topology), and pyvmm hides what its software platform does not offer:
x2APIC and the TSC-deadline timer (no MSR hooks in Unicorn), MONITOR/MWAIT.

The CPU says it is an in-order core (family 6, model 0x1C: the first Atom), which Linux lists
as not affected by speculative-execution flaws. A translating CPU executes nothing
speculatively, so the guest's mitigations would protect nothing, and on Unicorn's own model
(Haswell) they cost a Linux boot about a tenth of its time: page-table isolation flushes the
translator's TLB at every system call and interrupt, and retpolines and return thunks turn
branches into indirect ones. Pretending otherwise would need IA32_ARCH_CAPABILITIES, which
Unicorn does not implement. The brand string names the software CPU.
"""

from __future__ import annotations


import dataclasses
from dataclasses import replace

from ...arch.x86_64.cpuid import CpuidPolicy, guest_cpuid
from ...kvm.system import CpuidEntry
from ...arch.x86_64.tsc_leaf import fixed_crystal_tsc_leaf, tsc_leaf

# Leaves whose subleaf (ECX) selects different data.
INDEXED_LEAVES = {4: 8, 7: 2, 0xB: 3, 0xD: 64, 0x8000001D: 8}
PLATFORM_HIDDEN = {"x2apic", "tsc_deadline_timer", "monitor", "pdcm"}


def _native_cpuid(uc, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    import unicorn.x86_const as X

    uc.reg_write(X.UC_X86_REG_RAX, leaf)
    uc.reg_write(X.UC_X86_REG_RCX, subleaf)
    uc.emu_start(0x1000, 0x1002)
    return tuple(uc.reg_read(r) & 0xFFFFFFFF for r in (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX,
                                                        X.UC_X86_REG_RCX, X.UC_X86_REG_RDX))


def translator_cpuid() -> list[CpuidEntry]:
    """Every leaf Unicorn's CPU model answers, as CpuidEntry objects (remembered per build)."""
    from .probe_cache import remembered

    return remembered("cpuid", _ask_translator, to_json=lambda entries: [dataclasses.astuple(e) for e in entries],
                      from_json=lambda rows: [CpuidEntry(*row) for row in rows])


def _ask_translator() -> list[CpuidEntry]:
    import unicorn as U

    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\x0f\xa2")
    entries = []
    for base in (0, 0x80000000):
        top = _native_cpuid(uc, base, 0)[0]
        for leaf in range(base, min(top, base + 0x40) + 1):
            for subleaf in range(INDEXED_LEAVES.get(leaf, 1)):
                eax, ebx, ecx, edx = _native_cpuid(uc, leaf, subleaf)
                flags = 1 if leaf in INDEXED_LEAVES else 0
                entries.append(CpuidEntry(leaf, subleaf, flags, eax, ebx, ecx, edx))
    return entries


class CpuidTable:
    """One vCPU's CPUID answers."""

    def __init__(self, entries: list[CpuidEntry]) -> None:
        self.entries = list(entries)
        self._exact = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in entries}
        self._max_basic = max((e.function for e in entries if e.function < 0x80000000), default=0)
        self._max_extended = max((e.function for e in entries if e.function >= 0x80000000), default=0)

    def lookup(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        if leaf in INDEXED_LEAVES:
            return self._exact.get((leaf, subleaf), (0, 0, 0, 0))
        found = self._exact.get((leaf, 0))
        if found is not None:
            return found
        # Out-of-range basic leaves answer like the highest basic leaf (Intel's behaviour).
        if leaf < 0x80000000 and leaf > self._max_basic:
            return self._exact.get((self._max_basic, 0), (0, 0, 0, 0))
        return (0, 0, 0, 0)


IN_ORDER_FAMILY, IN_ORDER_MODEL, IN_ORDER_STEPPING = 6, 0x1C, 10
BRAND = "pyvmm software CPU"
BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)


def signature(family: int, model: int, stepping: int) -> int:
    """CPUID leaf 1 EAX for a family 6 or 15 CPU (extended model in bits 19:16)."""
    return stepping | (model & 0xF) << 4 | family << 8 | (model >> 4) << 16


def as_in_order_cpu(entries: list[CpuidEntry]) -> list[CpuidEntry]:
    """The same features, with the in-order signature and pyvmm's brand string (see above)."""
    brand = BRAND.encode().ljust(16 * len(BRAND_LEAVES), b"\0")
    out = []
    for e in entries:
        if e.function == 1:
            e = replace(e, eax=signature(IN_ORDER_FAMILY, IN_ORDER_MODEL, IN_ORDER_STEPPING))
        elif e.function in BRAND_LEAVES:
            chunk = brand[16 * BRAND_LEAVES.index(e.function):][:16]
            e = replace(e, eax=int.from_bytes(chunk[0:4], "little"), ebx=int.from_bytes(chunk[4:8], "little"),
                        ecx=int.from_bytes(chunk[8:12], "little"), edx=int.from_bytes(chunk[12:16], "little"))
        out.append(e)
    return out


TSC_LEAF = 0x15
INVARIANT_TSC = 1 << 8  # CPUID 0x80000007 EDX


def with_tsc_frequency(entries: list[CpuidEntry], tsc_hz: int, lapic_timer_hz: int | None = None) -> list[CpuidEntry]:
    """Announce the TSC rate (leaf 0x15, see `arch.x86_64.tsc_leaf`) and an invariant TSC.

    Unicorn's RDTSC is the host's TSC, which runs at a constant known rate; saying so spares
    the guest a PIT calibration, which fails when port I/O is slow (Linux then marks the TSC
    unstable and boots with a poor clock). Linux also takes the LAPIC timer's rate from the
    crystal, so pyvmm's LAPIC timer counts at `tsc_leaf(tsc_hz).crystal_hz`; with a fixed
    `lapic_timer_hz` (KVM's) the leaf has that crystal where it can express the TSC rate, else
    it is empty, as KVM's (arch/x86_64/cpuid.kvm_tsc_leaf)."""
    leaf = tsc_leaf(tsc_hz) if lapic_timer_hz is None else fixed_crystal_tsc_leaf(tsc_hz, lapic_timer_hz)
    out = []
    for e in entries:
        if e.function == 0 and e.eax < TSC_LEAF:
            e = replace(e, eax=TSC_LEAF)
        elif e.function == 0x80000007:
            e = replace(e, edx=e.edx | INVARIANT_TSC)
        if e.function != TSC_LEAF:
            out.append(e)
    out.append(CpuidEntry(TSC_LEAF, 0, 0, leaf.denominator, leaf.numerator, leaf.crystal_hz, 0) if leaf is not None
               else CpuidEntry(TSC_LEAF, 0, 0, 0, 0, 0, 0))
    if not any(e.function == 0x80000007 for e in out):
        out.append(CpuidEntry(0x80000007, 0, 0, 0, 0, 0, INVARIANT_TSC))
    return out


def tcg_cpuid_tables(policy: CpuidPolicy, vcpu_count: int, tsc_hz: int | None = None,
                     lapic_timer_hz: int | None = None) -> list[CpuidTable]:
    base = as_in_order_cpu(translator_cpuid())
    if tsc_hz:
        base = with_tsc_frequency(base, tsc_hz, lapic_timer_hz)
    effective = CpuidPolicy(set(policy.hidden) | PLATFORM_HIDDEN)
    return [CpuidTable(guest_cpuid(base, effective, index, vcpu_count)) for index in range(vcpu_count)]


