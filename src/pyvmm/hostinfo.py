"""`pyvmm kvm-info`: what this host's KVM offers, and how fast it really runs guest code.

The calibration boots a tiny guest that times a loop in kernel mode (CPL0) and
the same loop in user mode (CPL3). On a host with VT-x/AMD-V both run natively;
on a nested or software-assisted KVM (like kvm_pvm) kernel code is emulated and
runs thousands of times slower, which makes Linux guests impractically slow.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import PyvmmError
from .kvm import Kvm, uapi

KERNEL_ITERATIONS = 20_000
USER_ITERATIONS = 20_000_000
INSTRUCTIONS_PER_ITERATION = 2  # dec + jnz
# Kernel code slower than user code by more than this means it is emulated, not run natively.
EMULATION_THRESHOLD = 20.0

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


@dataclass(frozen=True)
class Calibration:
    kernel_seconds: float
    user_seconds: float
    kernel_iterations: int = KERNEL_ITERATIONS
    user_iterations: int = USER_ITERATIONS

    @property
    def kernel_mips(self) -> float:
        return self.kernel_iterations * INSTRUCTIONS_PER_ITERATION / self.kernel_seconds / 1e6

    @property
    def user_mips(self) -> float:
        return self.user_iterations * INSTRUCTIONS_PER_ITERATION / self.user_seconds / 1e6

    @property
    def slowdown(self) -> float:
        """How many times slower kernel-mode code runs than user-mode code."""
        return self.user_mips / self.kernel_mips

    @property
    def kernel_code_emulated(self) -> bool:
        return self.slowdown > EMULATION_THRESHOLD


class _Markers:
    """Timestamps each phase marker the calibration guest writes; the last one ends the VM."""

    LAST = 4

    def __init__(self, on_last) -> None:
        self.marks: dict[int, float] = {}
        self._on_last = on_last

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        marker = int.from_bytes(data, "little")
        self.marks[marker] = time.perf_counter()
        if marker == self.LAST:
            self._on_last()


class CalibrationError(PyvmmError, RuntimeError):
    pass


def calibrate(timeout: float = 60.0) -> Calibration:
    """Boot the calibration guest on KVM and time its two loops."""
    from .builder import build_vm
    from .config import MachineConfig
    from .guests import CALIBRATE_KERNEL_ITERS_ADDR, CALIBRATE_MMIO, build
    from .vm import EXIT_OK, VmOutcome

    from .accel.kvm import KvmAccelerator

    config = MachineConfig(memory=16 << 20, cpus=1)  # measures KVM itself, whatever auto would pick
    vm = build_vm(config, lambda data: None, kernel_path=str(build("calibrate")), accel=KvmAccelerator())
    markers = _Markers(lambda: vm.request_stop(VmOutcome("poweroff", EXIT_OK, "calibration done")))
    vm.mmio_bus.register(CALIBRATE_MMIO, 4, markers, "calibration")
    vm.memory.write(CALIBRATE_KERNEL_ITERS_ADDR, struct.pack("<II", KERNEL_ITERATIONS, USER_ITERATIONS))
    outcome = vm.run(timeout)
    if not all(m in markers.marks for m in (1, 2, 3, 4)):
        raise CalibrationError(f"the calibration guest did not finish: {outcome.message}")
    return Calibration(markers.marks[2] - markers.marks[1], markers.marks[4] - markers.marks[3])


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

