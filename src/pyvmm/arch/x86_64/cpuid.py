"""The guest CPUID: what the accelerator supports, filtered by a policy, per vCPU.

The policy hides features by name (`--cpu-hide xsave,cx16`, or any bit as `leaf 0x7.0 EDX
bit 4`); topology leaves are rewritten so each vCPU sees its own APIC ID in a one-socket,
N-core package.
On KVM, `kvm_guest_cpuid` adds KVM's paravirtual leaves (0x40000000 signature,
0x40000001 features such as kvm-clock, PV EOI and steal time), limited to what
the kernel module reports and implements by itself; the software CPU never
shows them, since it implements none of their MSRs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ...errors import UserError
from ...kvm.system import CpuidEntry
from .tsc_leaf import fixed_crystal_tsc_leaf

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"

# name -> (leaf, subleaf, register, bit). The names are those of /proc/cpuinfo.
FEATURES: dict[str, tuple[int, int, str, int]] = {
    "pni": (1, 0, ECX, 0),
    "pclmulqdq": (1, 0, ECX, 1),
    "monitor": (1, 0, ECX, 3),
    "vmx": (1, 0, ECX, 5),
    "ssse3": (1, 0, ECX, 9),
    "fma": (1, 0, ECX, 12),
    "cx16": (1, 0, ECX, 13),
    "pdcm": (1, 0, ECX, 15),
    "pcid": (1, 0, ECX, 17),
    "sse4_1": (1, 0, ECX, 19),
    "sse4_2": (1, 0, ECX, 20),
    "x2apic": (1, 0, ECX, 21),
    "movbe": (1, 0, ECX, 22),
    "popcnt": (1, 0, ECX, 23),
    "tsc_deadline_timer": (1, 0, ECX, 24),
    "aes": (1, 0, ECX, 25),
    "xsave": (1, 0, ECX, 26),
    "osxsave": (1, 0, ECX, 27),
    "avx": (1, 0, ECX, 28),
    "f16c": (1, 0, ECX, 29),
    "rdrand": (1, 0, ECX, 30),
    "hypervisor": (1, 0, ECX, 31),
    "vme": (1, 0, EDX, 1),
    "tsc": (1, 0, EDX, 4),
    "msr": (1, 0, EDX, 5),
    "pae": (1, 0, EDX, 6),
    "apic": (1, 0, EDX, 9),
    "mtrr": (1, 0, EDX, 12),
    "ss": (1, 0, EDX, 27),
    "ht": (1, 0, EDX, 28),
    "fsgsbase": (7, 0, EBX, 0),
    "tsc_adjust": (7, 0, EBX, 1),
    "bmi1": (7, 0, EBX, 3),
    "hle": (7, 0, EBX, 4),
    "avx2": (7, 0, EBX, 5),
    "smep": (7, 0, EBX, 7),
    "fdp_excptn_only": (7, 0, EBX, 6),
    "bmi2": (7, 0, EBX, 8),
    "erms": (7, 0, EBX, 9),
    "invpcid": (7, 0, EBX, 10),
    "rtm": (7, 0, EBX, 11),
    "zero_fcs_fds": (7, 0, EBX, 13),
    "avx512f": (7, 0, EBX, 16),
    "rdseed": (7, 0, EBX, 18),
    "adx": (7, 0, EBX, 19),
    "smap": (7, 0, EBX, 20),
    "clflushopt": (7, 0, EBX, 23),
    "clwb": (7, 0, EBX, 24),
    "sha_ni": (7, 0, EBX, 29),
    "umip": (7, 0, ECX, 2),
    "pku": (7, 0, ECX, 3),
    "gfni": (7, 0, ECX, 8),
    "la57": (7, 0, ECX, 16),
    "rdpid": (7, 0, ECX, 22),
    "cldemote": (7, 0, ECX, 25),
    "movdiri": (7, 0, ECX, 27),
    "movdir64b": (7, 0, ECX, 28),
    "fsrm": (7, 0, EDX, 4),
    "md_clear": (7, 0, EDX, 10),
    "serialize": (7, 0, EDX, 14),
    "tsxldtrk": (7, 0, EDX, 16),
    "spec_ctrl": (7, 0, EDX, 26),          # (not in /proc/cpuinfo: Linux's X86_FEATURE_* names)
    "intel_stibp": (7, 0, EDX, 27),
    "flush_l1d": (7, 0, EDX, 28),
    "arch_capabilities": (7, 0, EDX, 29),
    "spec_ctrl_ssbd": (7, 0, EDX, 31),
    "xsaveopt": (0xD, 1, EAX, 0),
    "xsavec": (0xD, 1, EAX, 1),
    "xsaves": (0xD, 1, EAX, 3),
    "lahf_lm": (0x80000001, 0, ECX, 0),
    "abm": (0x80000001, 0, ECX, 5),
    "3dnowprefetch": (0x80000001, 0, ECX, 8),
    "syscall": (0x80000001, 0, EDX, 11),
    "nx": (0x80000001, 0, EDX, 20),
    "pdpe1gb": (0x80000001, 0, EDX, 26),
    "rdtscp": (0x80000001, 0, EDX, 27),
    "lm": (0x80000001, 0, EDX, 29),
    # KVM paravirtual features (CPUID 0x40000001 EAX, Linux's KVM_FEATURE_* bits)
    "kvmclock_legacy": (0x40000001, 0, EAX, 0),     # kvm-clock through MSRs 0x11/0x12
    "kvm_nopiodelay": (0x40000001, 0, EAX, 1),
    "kvmclock": (0x40000001, 0, EAX, 3),            # kvm-clock through MSRs 0x4b564d00/01
    "kvm_asyncpf": (0x40000001, 0, EAX, 4),
    "kvm_steal_time": (0x40000001, 0, EAX, 5),
    "kvm_pv_eoi": (0x40000001, 0, EAX, 6),
    "kvm_pv_unhalt": (0x40000001, 0, EAX, 7),
    "kvm_pv_tlb_flush": (0x40000001, 0, EAX, 9),
    "kvm_asyncpf_vmexit": (0x40000001, 0, EAX, 10),
    "kvm_pv_ipi": (0x40000001, 0, EAX, 11),
    "kvm_poll_control": (0x40000001, 0, EAX, 12),
    "kvm_pv_sched_yield": (0x40000001, 0, EAX, 13),
    "kvm_asyncpf_int": (0x40000001, 0, EAX, 14),
    "kvmclock_stable": (0x40000001, 0, EAX, 24),    # the pvclock's TSC-stable flag may be trusted
}

# Features that are meaningless without another: hiding the first hides these too.
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "xsave": ("osxsave", "avx", "fma", "f16c", "avx2", "avx512f", "xsaveopt", "xsavec", "xsaves"),
    "avx": ("fma", "f16c", "avx2", "avx512f"),
    "kvmclock": ("kvmclock_legacy", "kvmclock_stable"),
    "kvm_asyncpf": ("kvm_asyncpf_vmexit", "kvm_asyncpf_int"),
}

# Never shown to a guest: pyvmm does not offer nested virtualization.
ALWAYS_HIDDEN = frozenset({"vmx"})

# Hidden from KVM guests on a host whose KVM emulates guest kernel code (kvm_pvm; `pyvmm kvm-info`
# calibrates it): features whose instructions that emulator fails on at CPL0 and pyvmm cannot
# complete (accel/kvm/assist.py lists what was measured). popcnt and smap are not here: pyvmm
# completes popcnt, clac and stac. Caveat measured on kvm_pvm: it answers CPUID leaf 1 with
# the host's bits wherever KVM_GET_SUPPORTED_CPUID has none (popcnt, xsave, sse4_2, ...) and
# leaf 7 entirely from the host, so of this list only cx16 (and rdtscp, which it already
# hides) actually disappears there; on hosts that honour KVM_SET_CPUID2 all of it does.
EMULATED_KERNEL_HIDDEN = frozenset({
    "cx16",                                     # cmpxchg16b: must be atomic against other vCPUs
    "xsave",                                    # xgetbv, xsave, xrstor, xsaveopt, xsavec (and AVX with it)
    "pni", "ssse3", "sse4_1", "sse4_2", "aes", "pclmulqdq", "sha_ni", "gfni",  # SSE arithmetic
    "bmi1", "bmi2", "adx", "movbe",             # VEX encodings, adcx; movbe raises #UD
    "rdtscp", "rdpid", "clwb", "rtm", "movdiri", "movdir64b",
})

# KVM_FEATURE_* bits pyvmm offers when KVM reports them: all are MSRs and hypercalls KVM
# serves in the kernel. Left out: MMU_OP (2, removed from KVM), MSI_EXT_DEST_ID (15, needs
# the VMM's MSI routing to know the extended destination ID), HC_MAP_GPA_RANGE (16) and
# MIGRATION_CONTROL (17), which exit to the VMM.
KVM_PV_OFFERED = frozenset({
    "kvmclock_legacy", "kvm_nopiodelay", "kvmclock", "kvm_asyncpf", "kvm_steal_time", "kvm_pv_eoi",
    "kvm_pv_unhalt", "kvm_pv_tlb_flush", "kvm_asyncpf_vmexit", "kvm_pv_ipi", "kvm_poll_control",
    "kvm_pv_sched_yield", "kvm_asyncpf_int", "kvmclock_stable",
})
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
HYPERVISOR_LEAVES = range(0x40000000, 0x50000000)
TSC_LEAF = 0x15  # TSC rate = crystal (ECX) * EBX / EAX; see tsc_leaf.py


class UnknownFeature(UserError, ValueError):
    pass


_BIT_NAME = re.compile(r"^leaf (0x[0-9a-f]+)\.(\d+) (EAX|EBX|ECX|EDX) bit (\d+)$")


def bit_name(leaf: int, subleaf: int, register: str, bit: int) -> str:
    """The name of a feature bit pyvmm has no word for (what a refusal to migrate lists); a
    policy accepts it like a named one, so any bit a host shows can be hidden."""
    return f"leaf {leaf:#x}.{subleaf} {register.upper()} bit {bit}"


def feature_bit(name: str) -> tuple[int, int, str, int] | None:
    """(leaf, subleaf, register, bit) of a named feature or a bit_name(); None if neither."""
    if name in FEATURES:
        return FEATURES[name]
    match = _BIT_NAME.match(name)
    if match is None or int(match.group(4)) > 31:
        return None
    return int(match.group(1), 16), int(match.group(2)), match.group(3).lower(), int(match.group(4))


@dataclass
class CpuidPolicy:
    hidden: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        unknown = sorted(name for name in self.hidden if feature_bit(name) is None)
        if unknown:
            raise UnknownFeature(f"unknown CPU feature(s): {', '.join(unknown)} (known: {', '.join(sorted(FEATURES))}, "
                                 f"or any bit as '{bit_name(7, 0, EDX, 4)}')")

    def effective_hidden(self) -> set[str]:
        hidden = set(self.hidden) | ALWAYS_HIDDEN
        for name in list(hidden):
            hidden.update(DEPENDENTS.get(name, ()))
        return hidden

    def also_hiding(self, names) -> "CpuidPolicy":
        return CpuidPolicy(set(self.hidden) | set(names))


def _with_bit(entry: CpuidEntry, register: str, bit: int, value: bool) -> CpuidEntry:
    word = getattr(entry, register)
    word = word | (1 << bit) if value else word & ~(1 << bit)
    return replace(entry, **{register: word})


def guest_cpuid(supported: list[CpuidEntry], policy: CpuidPolicy, vcpu_index: int, vcpu_count: int) -> list[CpuidEntry]:
    """The CPUID table for one vCPU (its APIC ID is its index)."""
    hidden = policy.effective_hidden()
    core_bits = max(vcpu_count - 1, 0).bit_length()
    out = []
    for entry in supported:
        for name in hidden:
            leaf, subleaf, register, bit = feature_bit(name)  # type: ignore[misc]  # (checked by the policy)
            if entry.function == leaf and entry.index == subleaf:
                entry = _with_bit(entry, register, bit, False)
        if entry.function == 1:
            entry = _with_bit(entry, ECX, 31, "hypervisor" not in hidden)  # we are a hypervisor
            entry = _with_bit(entry, EDX, 28, vcpu_count > 1 and "ht" not in hidden)
            ebx = entry.ebx & 0x0000FFFF
            ebx |= (vcpu_index & 0xFF) << 24
            ebx |= (min(1 << core_bits, 0xFF) if vcpu_count > 1 else 1) << 16
            entry = replace(entry, ebx=ebx)
        elif entry.function == 4 and (entry.eax & 0x1F):
            # cores per package in EAX[31:26]; one thread shares each core's caches
            eax = (entry.eax & 0x03FFFFFF & ~(0xFFF << 14)) | (min((1 << core_bits) - 1, 63) << 26)
            entry = replace(entry, eax=eax)
        elif entry.function in (0xB, 0x1F):
            entry = _topology_leaf(entry, vcpu_index, vcpu_count, core_bits)
        out.append(entry)
    return out


def _topology_leaf(entry: CpuidEntry, vcpu_index: int, vcpu_count: int, core_bits: int) -> CpuidEntry:
    if entry.index == 0:  # SMT level: one thread per core
        return replace(entry, eax=0, ebx=1, ecx=(1 << 8), edx=vcpu_index)
    if entry.index == 1:  # core level: all vCPUs in one package
        return replace(entry, eax=core_bits, ebx=vcpu_count, ecx=(2 << 8) | 1, edx=vcpu_index)
    return replace(entry, eax=0, ebx=0, ecx=entry.index, edx=vcpu_index)


def has_feature(entries: list[CpuidEntry], name: str) -> bool:
    leaf, subleaf, register, bit = FEATURES[name]
    for entry in entries:
        if entry.function == leaf and entry.index == subleaf:
            return bool(getattr(entry, register) >> bit & 1)
    return False


def kvm_pv_leaves(supported: list[CpuidEntry]) -> list[CpuidEntry]:
    """KVM's paravirtual leaves for a guest: the signature leaf (max leaf 0x40000001) and the
    KVM_PV_OFFERED features KVM_GET_SUPPORTED_CPUID reports; none when KVM reports no
    KVM_CPUID_FEATURES leaf."""
    reported = next((e for e in supported if e.function == KVM_CPUID_FEATURES), None)
    if reported is None:
        return []
    offered = 0
    for name in KVM_PV_OFFERED:
        offered |= 1 << FEATURES[name][3]
    ebx, ecx, edx = (int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))
    return [
        CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, ebx, ecx, edx),
        CpuidEntry(KVM_CPUID_FEATURES, 0, 0, reported.eax & offered, 0, 0, 0),
    ]


def kvm_tsc_leaf(tsc_khz: int | None) -> CpuidEntry:
    """Leaf 0x15 for a KVM guest whose TSC runs at `tsc_khz` (KVM_GET_TSC_KHZ): the host's own
    leaf describes the host's crystal, not KVM's 1 GHz LAPIC timer, so it is replaced by one
    with a 1 GHz crystal where that can express the rate, else emptied (kvm-clock carries it)."""
    leaf = fixed_crystal_tsc_leaf(tsc_khz * 1000) if tsc_khz else None
    if leaf is None:
        return CpuidEntry(TSC_LEAF, 0, 0, 0, 0, 0, 0)
    return CpuidEntry(TSC_LEAF, 0, 0, leaf.denominator, leaf.numerator, leaf.crystal_hz, 0)


def kvm_guest_cpuid(supported: list[CpuidEntry], policy: CpuidPolicy, vcpu_index: int,
                    vcpu_count: int, tsc_khz: int | None = None) -> list[CpuidEntry]:
    """guest_cpuid for the KVM backend: the host's hypervisor leaves replaced by the KVM
    paravirtual leaves pyvmm offers (kvm_pv_leaves), the TSC leaf by one that matches the
    vCPU's TSC rate and KVM's LAPIC (kvm_tsc_leaf), then the policy applied to all."""
    base = [kvm_tsc_leaf(tsc_khz) if e.function == TSC_LEAF else e
            for e in supported if e.function not in HYPERVISOR_LEAVES] + kvm_pv_leaves(supported)
    return guest_cpuid(base, policy, vcpu_index, vcpu_count)
