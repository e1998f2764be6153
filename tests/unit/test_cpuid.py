"""Guest CPUID filtering and topology (src/pyvmm/arch/x86_64/cpuid.py), on a synthetic host table."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.arch.x86_64.cpuid import (
    DEPENDENTS,
    EMULATED_KERNEL_HIDDEN,
    FEATURES,
    KVM_PV_OFFERED,
    CpuidPolicy,
    UnknownFeature,
    bit_name,
    feature_bit,
    guest_cpuid,
    has_feature,
    kvm_guest_cpuid,
    kvm_pv_leaves,
)
from pyvmm.kvm.system import CpuidEntry

ALL = 0xFFFFFFFF
REGS = ("eax", "ebx", "ecx", "edx")

# Leaf 1 EBX on the "host": APIC ID 0x2A, 16 logical CPUs, CLFLUSH line 8 qwords, brand 0x03.
HOST_LEAF1_EBX = 0x2A10_0803
# Leaf 4 cache descriptors: type/level/self-init in the low bits; host claims 8 cores, 2 threads/cache.
L1D = (7 << 26) | (1 << 14) | (1 << 8) | (1 << 5) | 1      # data cache, level 1, self-initialising
L1I = (7 << 26) | (1 << 14) | (1 << 8) | (1 << 5) | 2      # instruction cache, level 1
L2 = (7 << 26) | (1 << 14) | (1 << 8) | (2 << 5) | 3       # unified, level 2


def E(function, index=0, eax=0, ebx=0, ecx=0, edx=0, flags=0):
    return CpuidEntry(function=function, index=index, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx)


def supported(hypervisor_bit=True):
    leaf1_ecx = ALL if hypervisor_bit else ALL & ~(1 << 31)
    return [
        E(0, eax=0xD, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        E(1, eax=0x000906EA, ebx=HOST_LEAF1_EBX, ecx=leaf1_ecx, edx=ALL),
        E(4, 0, eax=L1D, ebx=0x01C0003F, ecx=0x3F, edx=0),
        E(4, 1, eax=L1I, ebx=0x01C0003F, ecx=0x3F, edx=0),
        E(4, 2, eax=L2, ebx=0x00C0003F, ecx=0x3FF, edx=0),
        E(4, 3, eax=0, ebx=0, ecx=0, edx=0),                     # no more caches
        E(7, 0, eax=0, ebx=ALL, ecx=ALL, edx=ALL),
        E(0xB, 0, eax=1, ebx=2, ecx=0x100, edx=0x2A),
        E(0xB, 1, eax=4, ebx=16, ecx=0x201, edx=0x2A),
        E(0xB, 2, eax=0, ebx=0, ecx=0x2, edx=0x2A),
        E(0xD, 0, eax=0x7, ebx=0x340, ecx=0x340, edx=0),
        E(0xD, 1, eax=0xF, ebx=0, ecx=0, edx=0),
        E(0x80000000, eax=0x80000008),
        E(0x80000001, eax=0, ebx=0, ecx=ALL, edx=ALL),
        E(0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),   # as KVM reports them
        E(0x40000001, eax=ALL),
    ]


def by_key(entries):
    table = {}
    for e in entries:
        assert (e.function, e.index) not in table, "duplicate leaf in output"
        table[(e.function, e.index)] = e
    return table


def run(hidden=(), index=0, count=1, table=None):
    return guest_cpuid(table if table is not None else supported(), CpuidPolicy(set(hidden)), index, count)


def bit_diff(before, after):
    """{(leaf, subleaf, reg, bit)} for every bit set in `before` and clear in `after` (and vice versa)."""
    a, b = by_key(before), by_key(after)
    assert a.keys() == b.keys()
    diff = set()
    for key in a:
        for reg in REGS:
            x = getattr(a[key], reg) ^ getattr(b[key], reg)
            diff |= {(key[0], key[1], reg, bit) for bit in range(64) if x >> bit & 1}
    return diff


def feature_bits(names):
    return {FEATURES[n] for n in names}


# Bits pyvmm computes itself whatever the policy says (hypervisor: always on; ht: from the vCPU count).
COMPUTED = {"hypervisor", "ht"}
PLAIN = sorted(n for n in FEATURES if n not in DEPENDENTS and n not in COMPUTED and n != "vmx")


# --- feature filtering -------------------------------------------------------------------


@pytest.mark.parametrize("name", PLAIN)
def test_hiding_a_feature_clears_exactly_its_bit(name):
    baseline = run()
    hidden = run({name})
    assert bit_diff(baseline, hidden) == feature_bits({name})
    assert has_feature(baseline, name)
    assert not has_feature(hidden, name)


@pytest.mark.parametrize("name", sorted(DEPENDENTS))
def test_hiding_a_feature_hides_its_dependents_and_nothing_else(name):
    hidden = run({name})
    expected = {name, *DEPENDENTS[name]}
    assert bit_diff(run(), hidden) == feature_bits(expected)
    for dep in expected:
        assert not has_feature(hidden, dep), dep


def test_hiding_xsave_hides_the_avx_family():
    out = run({"xsave"})
    for name in ("xsave", "osxsave", "avx", "avx2", "fma", "f16c", "avx512f", "xsaveopt", "xsavec", "xsaves"):
        assert not has_feature(out, name), name
    for name in ("sse4_2", "aes", "bmi2", "lm", "pclmulqdq"):
        assert has_feature(out, name), name


def test_hiding_avx_keeps_xsave():
    out = run({"avx"})
    for name in ("avx", "avx2", "fma", "f16c", "avx512f"):
        assert not has_feature(out, name), name
    for name in ("xsave", "osxsave", "xsaveopt", "bmi1"):
        assert has_feature(out, name), name


def test_hiding_several_features_combines():
    assert bit_diff(run(), run({"cx16", "rdrand", "nx"})) == feature_bits({"cx16", "rdrand", "nx"})


def test_vmx_always_hidden():
    assert not has_feature(run(), "vmx")
    assert not has_feature(run({"cx16"}), "vmx")
    assert by_key(run())[(1, 0)].ecx >> 5 & 1 == 0
    assert "vmx" in CpuidPolicy().effective_hidden()


def test_hypervisor_bit_set_even_when_host_lacks_it():
    out = by_key(run(table=supported(hypervisor_bit=False)))
    assert out[(1, 0)].ecx >> 31 & 1 == 1


def test_leaves_without_policy_are_untouched():
    src = by_key(supported())
    out = by_key(run({"xsave", "nx", "avx2"}, index=2, count=4))
    for key in [(0, 0), (0xD, 0), (0x80000000, 0)]:
        assert out[key] == src[key]
    assert len(run()) == len(supported())


def test_input_order_preserved():
    assert [(e.function, e.index) for e in run(count=4)] == [(e.function, e.index) for e in supported()]


def test_unknown_feature_raises_naming_it():
    with pytest.raises(UnknownFeature) as info:
        CpuidPolicy({"avx", "notafeature"})
    message = str(info.value)
    assert "notafeature" in message
    assert "\n" not in message
    unknown_part = message.split("(known")[0]
    assert "avx" not in unknown_part   # only the bad name is reported as unknown
    assert isinstance(info.value, ValueError)


def test_unknown_features_all_listed():
    with pytest.raises(UnknownFeature) as info:
        CpuidPolicy({"zzz", "yyy"})
    unknown_part = str(info.value).split("(known")[0]
    assert "zzz" in unknown_part and "yyy" in unknown_part


def test_any_bit_can_be_hidden_by_its_bit_name():
    # what a refused migration lists for a bit pyvmm has no word for (accel/cross.py)
    name = bit_name(7, 0, "edx", 9)
    assert feature_bit(name) == (7, 0, "edx", 9)
    baseline, hidden = by_key(run()), by_key(run({name}))
    assert baseline[(7, 0)].edx >> 9 & 1 and not hidden[(7, 0)].edx >> 9 & 1
    assert hidden[(7, 0)].edx == baseline[(7, 0)].edx & ~(1 << 9)


@pytest.mark.parametrize("name", ["leaf 0x7.0 EDX bit 32", "leaf 7.0 EDX bit 3", "leaf 0x7.0 EFX bit 3", "leaf 0x7 EDX bit 3"])
def test_malformed_bit_names_are_unknown(name):
    assert feature_bit(name) is None
    with pytest.raises(UnknownFeature):
        CpuidPolicy({name})


def test_has_feature_missing_leaf_is_false():
    table = [e for e in supported() if e.function != 7]
    assert not has_feature(table, "avx2")
    assert has_feature(table, "avx")
    assert not has_feature([], "lm")


# --- topology ----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_leaf1_apic_id_per_vcpu(count):
    for index in range(count):
        leaf1 = by_key(run(index=index, count=count))[(1, 0)]
        assert leaf1.ebx >> 24 == index
        assert leaf1.ebx & 0xFFFF == HOST_LEAF1_EBX & 0xFFFF   # CLFLUSH size, brand index kept


@pytest.mark.parametrize("count", [1, 3, 4])
def test_leaf_b_edx_is_the_x2apic_id_at_every_level(count):
    for index in range(count):
        out = by_key(run(index=index, count=count))
        for sub in (0, 1, 2):
            assert out[(0xB, sub)].edx == index


def test_single_vcpu_logical_count_and_htt():
    leaf1 = by_key(run(count=1))[(1, 0)]
    assert leaf1.ebx >> 16 & 0xFF == 1
    assert leaf1.edx >> 28 & 1 == 0          # host had HTT set: cleared for one vCPU
    assert not has_feature(run(count=1), "ht")


def test_four_vcpus_logical_count_and_htt():
    leaf1 = by_key(run(index=3, count=4))[(1, 0)]
    assert leaf1.ebx >> 16 & 0xFF == 4
    assert leaf1.edx >> 28 & 1 == 1
    assert has_feature(run(count=4), "ht")


@pytest.mark.parametrize("count, logical", [(2, 2), (3, 4), (5, 8), (16, 16)])
def test_logical_count_rounds_up_to_a_power_of_two(count, logical):
    assert by_key(run(count=count))[(1, 0)].ebx >> 16 & 0xFF == logical


@pytest.mark.parametrize("count, cores_field", [(1, 0), (2, 1), (4, 3), (3, 3), (8, 7)])
def test_leaf4_cores_per_package(count, cores_field):
    src = by_key(supported())
    out = by_key(run(count=count))
    for sub in (0, 1, 2):
        eax = out[(4, sub)].eax
        assert eax >> 26 == cores_field
        assert eax >> 14 & 0xFFF == 0                              # one thread per cache
        assert eax & 0x3FFF == src[(4, sub)].eax & 0x3FFF          # type, level etc. kept
        assert out[(4, sub)].ebx == src[(4, sub)].ebx
    assert out[(4, 3)] == src[(4, 3)]                              # the null subleaf is left alone


@pytest.mark.parametrize("count, shift", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4)])
def test_leaf_b_levels(count, shift):
    out = by_key(run(index=count - 1, count=count))
    smt, core, end = out[(0xB, 0)], out[(0xB, 1)], out[(0xB, 2)]
    # SMT level: level number 0, type 1, one thread, shift 0
    assert (smt.ecx & 0xFF, smt.ecx >> 8 & 0xFF) == (0, 1)
    assert smt.eax & 0x1F == 0
    assert smt.ebx & 0xFFFF == 1
    # core level: level number 1, type 2, all vCPUs, shift = bits needed for the APIC IDs
    assert (core.ecx & 0xFF, core.ecx >> 8 & 0xFF) == (1, 2)
    assert core.eax & 0x1F == shift
    assert core.ebx & 0xFFFF == count
    # level 2: invalid type ends the enumeration, level number echoed
    assert (end.ecx & 0xFF, end.ecx >> 8 & 0xFF) == (2, 0)
    assert end.eax == 0 and end.ebx == 0


@given(st.integers(1, 255))
def test_leaf_b_shift_puts_all_vcpus_in_one_package(count):
    ids, packages = set(), set()
    for index in sorted({0, count // 2, count - 1}):
        core = by_key(run(index=index, count=count))[(0xB, 1)]
        shift = core.eax & 0x1F
        assert 1 << shift >= count
        assert shift == 0 or 1 << (shift - 1) < count           # and no wider than needed
        ids.add(core.edx)
        packages.add(core.edx >> shift)
    assert len(packages) == 1
    assert len(ids) == len({0, count // 2, count - 1})


@pytest.mark.parametrize("count", [1, 2, 4, 64, 65, 128, 255])
def test_all_registers_fit_in_32_bits(count):
    """CPUID registers are 32 bits; leaf 4 EAX[31:26] is a 6-bit field that must saturate at 63."""
    out = run(index=count - 1, count=count)
    for e in out:
        for reg in REGS:
            assert 0 <= getattr(e, reg) < 1 << 32, (hex(e.function), e.index, reg, hex(getattr(e, reg)))
    leaf4 = by_key(out)[(4, 0)]
    assert leaf4.eax >> 26 == min((1 << (count - 1).bit_length()) - 1, 63)
    expected_logical = min(1 << (count - 1).bit_length(), 0xFF) if count > 1 else 1
    assert by_key(out)[(1, 0)].ebx >> 16 & 0xFF == expected_logical


# --- KVM paravirtual leaves (kvm_guest_cpuid) ------------------------------------------------

KVM_SIGNATURE_REGS = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM\0\0\0" in EBX, ECX, EDX
# Linux's KVM_FEATURE_* numbers, from Documentation/virt/kvm/x86/cpuid.rst
KVM_FEATURE_BITS = {"kvmclock_legacy": 0, "kvm_nopiodelay": 1, "kvmclock": 3, "kvm_asyncpf": 4,
                    "kvm_steal_time": 5, "kvm_pv_eoi": 6, "kvm_pv_unhalt": 7, "kvm_pv_tlb_flush": 9,
                    "kvm_asyncpf_vmexit": 10, "kvm_pv_ipi": 11, "kvm_poll_control": 12,
                    "kvm_pv_sched_yield": 13, "kvm_asyncpf_int": 14, "kvmclock_stable": 24}


def kvm_run(hidden=(), table=None):
    return by_key(kvm_guest_cpuid(table if table is not None else supported(), CpuidPolicy(set(hidden)), 0, 1))


def test_kvm_signature_leaf():
    leaf = kvm_run()[(0x40000000, 0)]
    assert leaf.eax == 0x40000001                       # the highest KVM leaf
    assert (leaf.ebx, leaf.ecx, leaf.edx) == KVM_SIGNATURE_REGS
    raw = b"".join(r.to_bytes(4, "little") for r in (leaf.ebx, leaf.ecx, leaf.edx))
    assert raw == b"KVMKVMKVM\0\0\0"


def test_kvm_feature_bits_are_what_kvm_reports_and_pyvmm_offers():
    assert {name: FEATURES[name][3] for name in KVM_PV_OFFERED} == KVM_FEATURE_BITS
    offered = sum(1 << bit for bit in KVM_FEATURE_BITS.values())
    leaf = kvm_run()[(0x40000001, 0)]
    assert leaf.eax == offered                          # KVM reported every bit: only the offered ones pass
    for bit in (2, 15, 16, 17, 31):                     # MMU_OP, MSI_EXT_DEST_ID, MAP_GPA_RANGE, MIGRATION_CONTROL
        assert not leaf.eax >> bit & 1
    assert (leaf.ebx, leaf.ecx, leaf.edx) == (0, 0, 0)  # no hints (KVM_HINTS_REALTIME needs pinned vCPUs)
    only_clock = [e if e.function != 0x40000001 else E(0x40000001, eax=1 << 3 | 1 << 2) for e in supported()]
    assert kvm_run(table=only_clock)[(0x40000001, 0)].eax == 1 << 3   # never more than KVM reports


def test_kvm_leaves_replace_the_hosts_hypervisor_leaves():
    table = [e for e in supported() if e.function < 0x40000000 or e.function >= 0x50000000]
    table += [E(0x40000000, eax=0x40000010, ebx=0x7263694D), E(0x40000001, eax=ALL), E(0x40000010, eax=123)]
    out = kvm_run(table=table)
    assert [key for key in out if 0x40000000 <= key[0] < 0x50000000] == [(0x40000000, 0), (0x40000001, 0)]
    assert (out[(0x40000000, 0)].ebx, out[(0x40000000, 0)].eax) == (KVM_SIGNATURE_REGS[0], 0x40000001)


def test_no_kvm_leaves_when_kvm_reports_none():
    table = [e for e in supported() if not 0x40000000 <= e.function < 0x50000000]
    assert kvm_pv_leaves(table) == []
    assert not any(0x40000000 <= key[0] < 0x50000000 for key in kvm_run(table=table))


def test_guest_cpuid_adds_no_kvm_leaves():
    """The software CPU's path: guest_cpuid over a table without hypervisor leaves has none."""
    table = [e for e in supported() if not 0x40000000 <= e.function < 0x50000000]
    assert not any(0x40000000 <= e.function < 0x50000000 for e in run(table=table))


def test_hiding_kvmclock_hides_both_clock_interfaces_and_the_stable_bit():
    eax = kvm_run({"kvmclock"})[(0x40000001, 0)].eax
    for name in ("kvmclock", "kvmclock_legacy", "kvmclock_stable"):
        assert not eax >> KVM_FEATURE_BITS[name] & 1, name
    assert eax >> KVM_FEATURE_BITS["kvm_pv_eoi"] & 1 and eax >> KVM_FEATURE_BITS["kvm_steal_time"] & 1
    assert kvm_run({"kvmclock"})[(0x40000000, 0)].ebx == KVM_SIGNATURE_REGS[0]   # the signature stays


def test_kvm_guest_cpuid_keeps_the_other_leaves_and_topology():
    out = kvm_run({"cx16"})
    plain = by_key(run({"cx16"}))
    for key, entry in plain.items():
        if not 0x40000000 <= key[0] < 0x50000000:
            assert out[key] == entry


# --- hidden on a host whose KVM emulates kernel code -----------------------------------------

def test_emulated_kernel_hidden_names_are_known_and_leave_the_assisted_ones():
    assert EMULATED_KERNEL_HIDDEN <= FEATURES.keys()
    assert not EMULATED_KERNEL_HIDDEN & {"popcnt", "smap"}     # pyvmm completes popcnt, clac, stac
    out = kvm_guest_cpuid(supported(), CpuidPolicy().also_hiding(EMULATED_KERNEL_HIDDEN), 0, 1)
    for name in ("cx16", "xsave", "xsaveopt", "avx", "avx2", "sse4_2", "bmi2", "rdtscp", "clwb", "pni"):
        assert not has_feature(out, name), name
    for name in ("popcnt", "smap", "lm", "nx", "fsgsbase", "rdrand", "kvmclock", "kvm_pv_eoi"):
        assert has_feature(out, name), name


def test_also_hiding_keeps_the_users_choices():
    policy = CpuidPolicy({"nx"}).also_hiding({"cx16"})
    assert policy.hidden == {"nx", "cx16"}
    assert CpuidPolicy({"nx"}).hidden == {"nx"}
