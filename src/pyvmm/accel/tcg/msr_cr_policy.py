"""What RDMSR, WRMSR and MOV to/from CRn do where Unicorn's own helpers are wrong (SDM vol. 2
RDMSR/WRMSR/MOV-CR, vol. 3 2.5 and 10.4.4): IA32_APIC_BASE and CR8 are the local APIC's;
reserved bits of CR0, CR4 (every bit of a feature CPUID does not announce), EFER and
IA32_APIC_BASE raise #GP(0), and so do the writes IA-32e mode refuses (clearing CR0.PG in 64-bit
code, clearing CR4.PAE while EFER.LMA=1, changing EFER.LME while CR0.PG=1); the x2APIC MSRs raise #GP(0) (x2APIC is not announced); SYSRET
to 64-bit code with a non-canonical RCX raises #GP(0) at CPL0 before anything changes, as on
the Intel CPU this one says it is (Unicorn's QEMU does what AMD CPUs do: it returns to CPL3 and
faults there, on the user's stack, which is the privilege hole Intel's order closes).

An MSR this CPU does not implement raises #GP(0), as the SDM says (RDMSR/WRMSR: "if the value
in ECX specifies a reserved or unimplemented MSR address"); Unicorn's QEMU read it as 0 and
dropped writes. Implemented: the MSRs QEMU's helpers keep (KNOWN_MSRS, the machine-check banks
MCG_CAP announces), the TSC, and IA32_BIOS_SIGN_ID, which Linux writes unguarded to read the
microcode revision.

The helpers reach these through helper_patch.py; every other control register keeps Unicorn's
behaviour.
"""

from __future__ import annotations

import ctypes

import unicorn.x86_const as X

from ...platform.lapic_registers import REG_TPR
from . import helper_patch
from .helper_patch import GENERAL_PROTECTION, HANDLED, PASS

MSR_APIC_BASE, MSR_EFER = 0x1B, 0xC0000080
X2APIC_MSRS = range(0x800, 0x900)
APIC_BASE_RESERVED_LOW = 0xFF | 1 << 9 | 1 << 10  # bit 10 (x2APIC mode) with x2APIC unannounced
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1 << 0, 1 << 29, 1 << 30, 1 << 31
CR4_PAE = 1 << 5
# CR4 bit -> (CPUID leaf, subleaf, register index eax=0..edx=3, bit) of the feature it needs;
# None: architectural on every CPU this models (TSD, PCE).
CR4_FEATURES = {
    0: (1, 0, 3, 1), 1: (1, 0, 3, 1), 2: None, 3: (1, 0, 3, 2), 4: (1, 0, 3, 3), 5: (1, 0, 3, 6),
    6: (1, 0, 3, 7), 7: (1, 0, 3, 13), 8: None, 9: (1, 0, 3, 24), 10: (1, 0, 3, 25),
    11: (7, 0, 2, 2), 12: (7, 0, 2, 16), 13: (1, 0, 2, 5), 14: (1, 0, 2, 6), 16: (7, 0, 1, 0),
    17: (1, 0, 2, 17), 18: (1, 0, 2, 26), 20: (7, 0, 1, 7), 21: (7, 0, 1, 20), 22: (7, 0, 2, 3),
    23: (7, 0, 2, 7), 24: (7, 0, 2, 31), 28: (7, 1, 0, 26),
}


# The MSRs Unicorn's helper_rdmsr/helper_wrmsr (QEMU 5.0) keep, plus IA32_TSC and
# IA32_BIOS_SIGN_ID (0x8b, write), which every x86-64 CPU has (Unicorn reads the TSC MSR as 0).
KNOWN_MSRS = frozenset({
    0x10, 0x1B, 0x34, 0x8B, 0xFE, 0x174, 0x175, 0x176, 0x179, 0x17A, 0x17B, 0x198, 0x1A0, 0x277,
    *range(0x200, 0x210), 0x250, 0x258, 0x259, *range(0x268, 0x270), 0x2FF, 0xD90,
    0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100, 0xC0000101,
    0xC0000102, 0xC0000103, 0xC0010117,
})
MSR_MCG_CAP, MSR_MC0_CTL = 0x179, 0x400


def implemented(vcpu, msr: int) -> bool:
    if msr in KNOWN_MSRS:
        return True
    banks = getattr(vcpu, "_machine_check_banks", None)
    if banks is None:  # (a read of a known MSR: the filter passes it through)
        banks = vcpu._machine_check_banks = vcpu.regs.read_msr(MSR_MCG_CAP) & 0xFF
    return MSR_MC0_CTL <= msr < MSR_MC0_CTL + 4 * banks


def _vcpu():
    return getattr(helper_patch.running, "vcpu", None)


def _regs(env: int):
    return (ctypes.c_uint64 * 3).from_address(env)  # CPUX86State starts with RAX, RCX, RDX


def _announced(table, leaf: int, subleaf: int, register: int, bit: int) -> bool:
    return bool(table.lookup(leaf, subleaf)[register] >> bit & 1)


def cr4_allowed(table) -> int:
    allowed = 0
    for bit, feature in CR4_FEATURES.items():
        if feature is None or _announced(table, *feature):
            allowed |= 1 << bit
    return allowed


def _physical_bits(table) -> int:
    bits = table.lookup(0x80000008, 0)[0] & 0xFF
    return bits or 36


def rdmsr(env: int, _arg1: int, _arg2: int) -> tuple[int, int]:
    vcpu = _vcpu()
    if vcpu is None or vcpu.lapic is None:
        return PASS, 0
    regs = _regs(env)
    msr = regs[1] & 0xFFFFFFFF
    if msr == MSR_APIC_BASE:
        value = vcpu.lapic.apic_base
        regs[0], regs[2] = value & 0xFFFFFFFF, value >> 32
        return HANDLED, 0
    if msr in X2APIC_MSRS or not implemented(vcpu, msr):
        return GENERAL_PROTECTION, 0
    return PASS, 0


def wrmsr(env: int, _arg1: int, _arg2: int) -> tuple[int, int]:
    vcpu = _vcpu()
    if vcpu is None or vcpu.lapic is None:
        return PASS, 0
    regs = _regs(env)
    msr = regs[1] & 0xFFFFFFFF
    value = (regs[0] & 0xFFFFFFFF) | (regs[2] & 0xFFFFFFFF) << 32
    table = vcpu.cpuid_table
    if msr == MSR_APIC_BASE:
        if value & APIC_BASE_RESERVED_LOW or value >> _physical_bits(table):
            return GENERAL_PROTECTION, 0
        vcpu.lapic.write_apic_base(value)
        return HANDLED, 0
    if msr == MSR_EFER:
        changed = value ^ vcpu.regs.read_msr(MSR_EFER)
        if changed & EFER_LME and vcpu.regs.read(X.UC_X86_REG_CR0) & CR0_PG:
            return GENERAL_PROTECTION, 0  # LME is fixed while paging is on
        allowed = EFER_LMA  # read-only: a write of it is ignored
        for efer_bit, cpuid_bit in ((EFER_SCE, 11), (EFER_LME, 29), (EFER_NXE, 20)):
            if _announced(table, 0x80000001, 0, 3, cpuid_bit):
                allowed |= efer_bit
        return (GENERAL_PROTECTION if value & ~allowed else PASS), 0
    if msr in X2APIC_MSRS or not implemented(vcpu, msr):
        return GENERAL_PROTECTION, 0
    return PASS, 0


def write_cr(env: int, register: int, value: int) -> tuple[int, int]:
    vcpu = _vcpu()
    if vcpu is None:
        return PASS, 0
    register &= 0xFFFFFFFF
    if register == 0:
        if value >> 32 or (value & CR0_NW and not value & CR0_CD) or (value & CR0_PG and not value & CR0_PE):
            return GENERAL_PROTECTION, 0
        if not value & CR0_PG and vcpu.in_64bit_code():  # leaving IA-32e mode from 64-bit code
            return GENERAL_PROTECTION, 0
    elif register == 4:
        if value & ~cr4_allowed(vcpu.cpuid_table):
            return GENERAL_PROTECTION, 0
        if not value & CR4_PAE and vcpu.long_mode:
            return GENERAL_PROTECTION, 0
    elif register == 8 and vcpu.lapic is not None:
        if value & ~0xF:
            return GENERAL_PROTECTION, 0
        vcpu.lapic.write(REG_TPR, (value << 4).to_bytes(4, "little"))  # CR8 is TPR[7:4]
        return HANDLED, 0
    return PASS, 0


def read_cr(env: int, register: int, _arg2: int) -> tuple[int, int]:
    vcpu = _vcpu()
    if vcpu is None or vcpu.lapic is None or register & 0xFFFFFFFF != 8:
        return PASS, 0
    return HANDLED, int.from_bytes(vcpu.lapic.read(REG_TPR, 4), "little") >> 4 & 0xF


def sysret_guard(passthrough: int) -> bytes:
    """SYSRET (REX.W) with EFER.SCE set (the helper's own #UD comes first) and a non-canonical
    RCX: #GP(0), checked in machine code (every Linux system call returns with SYSRET). The
    CPUX86State offsets (EFER 0x250; RCX 8: env starts with RAX, RCX) are the ones the helper's
    own prologue, checked byte for byte, uses. A CPL or mode the helper refuses is #GP(0) too."""
    return bytes.fromhex(
        "83fe02"            # cmp $2, %esi: the helper's dflag for SYSRET with REX.W
        "751d"              # jne run_helper
        "f6875002000001"    # testb $EFER_SCE, 0x250(%rdi)
        "7414"              # je run_helper
        "488b4708"          # mov 8(%rdi), %rax: the guest's RCX
        "48c1f82f"          # sar $47, %rax: 0 or -1 when canonical (48-bit addresses)
        "4883c001"          # add $1, %rax
        "4883f801"          # cmp $1, %rax
        "7602"              # jbe run_helper
    ) + bytes([0xEB, passthrough])  # jmp over the helper's passthrough: raise #GP(0)


# What the filters above pass through without a look, decided in machine code (no Python call):
# a guest switching processes writes CR3, its page-fault handler reads CR2, and pyvmm reads
# EFER between slices. read_crN/write_crN get the register in %esi; RDMSR reads ECX from env.
def read_cr_skip(distance: int) -> bytes:
    """Every register but CR8 (the APIC's TPR)."""
    return helper_patch.branches([(bytes.fromhex("83fe08"), helper_patch.JNE)], distance)  # cmp $8,%esi


def write_cr_skip(distance: int) -> bytes:
    """CR2 and CR3 (no reserved bits this policy checks)."""
    return helper_patch.branches([(bytes.fromhex("83fe03"), helper_patch.JE),      # cmp $3,%esi
                                  (bytes.fromhex("83fe02"), helper_patch.JE)], distance)  # cmp $2,%esi


def rdmsr_skip(distance: int) -> bytes:
    """EFER, STAR, LSTAR, CSTAR, FMASK (0xC0000080-84) and FS_BASE, GS_BASE, KERNEL_GS_BASE,
    TSC_AUX (0xC0000100-103): implemented MSRs that are not the APIC's."""
    return helper_patch.branches([
        (bytes.fromhex("8b4708" "2d800000c0" "83f804"), helper_patch.JBE),  # eax = ECX - 0xC0000080; <= 4
        (bytes.fromhex("2d80000000" "83f803"), helper_patch.JBE),           # eax -= 0x80; <= 3
    ], distance)


def install() -> bool:
    """Patch the five helpers (once per process); False if this libunicorn cannot be patched."""
    results = [helper_patch.install("helper_rdmsr_x86_64", rdmsr, skip=rdmsr_skip),
               helper_patch.install("helper_wrmsr_x86_64", wrmsr),
               helper_patch.install("helper_write_crN_x86_64", write_cr, skip=write_cr_skip),
               helper_patch.install("helper_read_crN_x86_64", read_cr, skip=read_cr_skip),
               helper_patch.install_guard("helper_sysret_x86_64", sysret_guard)]
    return all(results)
