"""`pyvmm kvm-info`: what this host's KVM offers, and how fast it really runs guest code
(the calibration itself is accel/kvm/calibration.py, which `--accel auto` uses too).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import compiled
from .accel.kvm.calibration import calibrate
from .kvm import Kvm, uapi

CAPABILITIES = [
    (uapi.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY", True),
    (uapi.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP", True),
    (uapi.KVM_CAP_PIT2, "KVM_CAP_PIT2", True),
    (uapi.KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR", True),
    (uapi.KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID", True),
    (uapi.KVM_CAP_MP_STATE, "KVM_CAP_MP_STATE", True),
    (uapi.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT", True),
    (uapi.KVM_CAP_SET_IDENTITY_MAP_ADDR, "KVM_CAP_SET_IDENTITY_MAP_ADDR", False),
    (uapi.KVM_CAP_IRQFD, "KVM_CAP_IRQFD", False),
    (uapi.KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD", False),
    (uapi.KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING", False),
    (uapi.KVM_CAP_XSAVE, "KVM_CAP_XSAVE", False),
    (uapi.KVM_CAP_VCPU_EVENTS, "KVM_CAP_VCPU_EVENTS", False),
    (uapi.KVM_CAP_ADJUST_CLOCK, "KVM_CAP_ADJUST_CLOCK", False),
    (uapi.KVM_CAP_TSC_DEADLINE_TIMER, "KVM_CAP_TSC_DEADLINE_TIMER", False),
    (uapi.KVM_CAP_READONLY_MEM, "KVM_CAP_READONLY_MEM", False),
]


def host_virtualization() -> str:
    """The host's KVM flavour, from the loaded module and the CPU flags."""
    modules = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path("/sys/module", m).exists()]
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    hardware = "vmx" if "vmx" in flags else "svm" if "svm" in flags else "none"
    return f"module {', '.join(modules) or 'unknown'}; CPU virtualization flag: {hardware}"


def print_kvm_info(calibrate_guest: bool = True, out=None) -> int:
    import sys

    out = out or sys.stdout
    with Kvm() as kvm:
        print(f"device        {kvm.path} (KVM API {kvm.api_version})", file=out)
        print(f"host          {host_virtualization()}", file=out)
        in_use, why_not = compiled.status()
        print("compiled      " + ("yes (mypyc): the hot modules (pyvmm/compiled.py)" if in_use else
                                  f"NO ({why_not}): the hot modules run from source"), file=out)
        print(f"vCPUs         up to {kvm.max_vcpus} per VM; recommended {kvm.check_extension(uapi.KVM_CAP_NR_VCPUS)}; host CPUs {os.cpu_count()}", file=out)
        print("capabilities", file=out)
        missing = []
        for cap, name, required in CAPABILITIES:
            value = kvm.check_extension(cap)
            need = "required" if required else "optional"
            print(f"  {name:<32} {'yes' if value else 'NO ':<4} ({need})", file=out)
            if required and not value:
                missing.append(name)
        cpuid = kvm.supported_cpuid()
        print(f"cpuid         {len(cpuid)} leaves supported", file=out)
        from .arch.x86_64.cpuid import FEATURES, KVM_PV_OFFERED, kvm_pv_leaves

        pv = kvm_pv_leaves(cpuid)
        offered = sorted(name for name in KVM_PV_OFFERED if pv and pv[1].eax >> FEATURES[name][3] & 1)
        print(f"paravirtual   {' '.join(offered) or 'none'} (CPUID 0x40000001 for KVM guests)", file=out)
    if missing:
        print(f"verdict       pyvmm cannot use this KVM: missing {', '.join(missing)}", file=out)
        return 1
    if not calibrate_guest:
        return 0
    result = calibrate()
    print(f"calibration   kernel mode (CPL0): {result.kernel_mips:,.2f} M instructions/s; "
          f"user mode (CPL3): {result.user_mips:,.0f} M instructions/s", file=out)
    if result.kernel_code_emulated:
        from .arch.x86_64.cpuid import EMULATED_KERNEL_HIDDEN

        print(f"verdict       guest kernel code is EMULATED here ({result.slowdown:,.0f}x slower than user code): "
              "small guests work, Linux guests will be very slow on KVM", file=out)
        print(f"hidden        {' '.join(sorted(EMULATED_KERNEL_HIDDEN))}: pyvmm hides these from KVM guests "
              "here (emulated, their instructions fail; kvm_pvm still shows most from the host CPU)", file=out)
    else:
        print(f"verdict       guest kernel code runs natively (kernel/user speed ratio {result.slowdown:.1f}x)", file=out)
    return 0

