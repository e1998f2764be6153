"""Differential conformance runs: one Multiboot test kernel on pyvmm (each accelerator) and on QEMU.

The kernels live in tests/conformance/kernels (GNU as, built at test time with the guests'
common32.inc and the harness's conform.inc). Each prints `CHECK <name> ok|FAIL ...|skip ...`
lines on COM1 and ends with `DONE` and a debug exit whose value is the number of checks that
failed (the exit status is then 2n+1, isa-debug-exit's). `run(kernel, backend)` boots it on one
backend and returns the parsed results; a kernel that dies early has no line for the checks it
did not reach, and `DONE` is missing.

Backends: "tcg" (pyvmm's software CPU), "kvm" (pyvmm on /dev/kvm), "qemu" (qemu-system-x86_64
-accel tcg, the oracle), each a `pyvmm run` / QEMU process of its own, with the devices QEMU's
test kernels use (pyvmm --test-devices; QEMU -device pc-testdev, fw_cfg is always there).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from pyvmm.guests import build_source

KERNEL_DIR = pathlib.Path(__file__).resolve().parent.parent / "conformance" / "kernels"
BACKENDS = ("tcg", "kvm", "qemu")
QEMU = "qemu-system-x86_64"
# QEMU's CPU model for the oracle: "max" is every feature QEMU's TCG implements.
QEMU_CPU = "max"
_CHECK = re.compile(r"^CHECK (\S+) (ok|FAIL|skip)\b ?(.*)$")


@dataclass
class Run:
    backend: str
    kernel: str
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (ok|FAIL|skip, detail)
    done: bool = False
    status: int | None = None
    output: str = ""
    problem: str = ""  # why the backend could not run the kernel at all

    @property
    def exit_value(self) -> int | None:
        """The value the kernel wrote to the debug-exit port (status 2n+1), None without one."""
        if self.status is None or self.status % 2 == 0:
            return None
        return self.status >> 1

    @property
    def failed(self) -> int:
        return sum(1 for outcome, _ in self.results.values() if outcome == "FAIL")

    def outcome(self, check: str) -> str:
        """ok, FAIL, skip, or "missing" (the kernel died before the check)."""
        if self.problem:
            return "n/a"
        return self.results.get(check, ("missing", ""))[0]


def kernels() -> list[str]:
    return sorted(p.stem for p in KERNEL_DIR.glob("*.S"))


def kernel_path(name: str) -> pathlib.Path:
    """Built with guest.ld (linked at 1 MiB), or with kernels/<name>.ld where there is one.
    A kernel named *64 is assembled as x86-64 (it enters long mode itself) and converted to
    ELF32, which Multiboot loaders (QEMU's too) require."""
    script = KERNEL_DIR / f"{name}.ld"
    bits = 64 if name.endswith("64") else 32
    elf = build_source(KERNEL_DIR / f"{name}.S", bits, name=f"conform-{name}",
                       linker_script=script if script.exists() else None)
    if bits == 32:
        return elf
    converted = elf.with_name(elf.stem + "-elf32.elf")
    if not converted.exists():
        temporary = converted.with_name(f".{converted.name}.{os.getpid()}")
        subprocess.run(["objcopy", "-O", "elf32-i386", str(elf), str(temporary)], check=True,
                       capture_output=True, timeout=60)
        os.replace(temporary, converted)
    return converted


def parse(output: str) -> tuple[dict[str, tuple[str, str]], bool]:
    results: dict[str, tuple[str, str]] = {}
    done = False
    for raw in output.splitlines():
        line = raw.strip("\r\x00 ")
        match = _CHECK.match(line)
        if match:
            results[match.group(1)] = (match.group(2), match.group(3))
        elif line == "DONE":
            done = True
    return results, done


def kvm_problem() -> str | None:
    from pyvmm.kvm import Kvm, KvmUnavailable

    try:
        Kvm().close()
    except KvmUnavailable as exc:
        return str(exc)
    return None


def qemu_problem() -> str | None:
    if shutil.which(QEMU):
        return None
    problem = f"{QEMU} not installed (Debian: qemu-system-x86; scripts/setup installs it)"
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs the conformance oracle: {problem}")
    return problem


def _command(backend: str, kernel: pathlib.Path) -> list[str]:
    if backend == "qemu":
        return [QEMU, "-accel", "tcg", "-cpu", QEMU_CPU, "-m", "64", "-kernel", str(kernel),
                "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-device", "pc-testdev"]
    return [sys.executable, "-m", "pyvmm.cli", "run", "--accel", backend, "--memory", "64M",
            "--test-devices", "--kernel", str(kernel)]


def run(name: str, backend: str, timeout: float = 60) -> Run:
    result = Run(backend, name)
    problem = qemu_problem() if backend == "qemu" else kvm_problem() if backend == "kvm" else None
    if problem:
        result.problem = problem
        return result
    try:
        completed = subprocess.run(_command(backend, kernel_path(name)), stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace")
        result.results, result.done = parse(output)
        result.output = output + f"\n[timed out after {timeout} s]"
        return result
    result.output = completed.stdout.decode(errors="replace") + completed.stderr.decode(errors="replace")
    result.status = completed.returncode
    result.results, result.done = parse(completed.stdout.decode(errors="replace"))
    return result


# (backend, check) -> why it deviates. "missing": the kernel never reaches the check (a hang).
DEVIATIONS: dict[tuple[str, str], str] = {
    # --- QEMU 7.2 (Debian) TCG, where the SDM says otherwise
    ("qemu", "msr.efer_reserved_bit_gp"): "QEMU's TCG ignores reserved EFER bits in WRMSR",
    ("qemu", "msr.rdmsr_unknown_gp"): "QEMU's TCG reads an unknown MSR as 0 instead of #GP",
    ("qemu", "msr.wrmsr_unknown_gp"): "QEMU's TCG drops a write to an unknown MSR instead of #GP",
    ("qemu", "cr4.lam_sup_unannounced_gp"): "QEMU 7.2's TCG loops forever on a MOV to CR4 with a reserved bit",
    ("qemu", "cr4.reserved_bit15_gp"): "missing: QEMU hung on the LAM_SUP check before",
    ("qemu", "cr4.reserved_bit31_gp"): "missing: QEMU hung on the LAM_SUP check before",
    ("qemu", "cr0.nw_without_cd_gp"): "QEMU's TCG accepts CR0.NW=1 with CD=0",
    ("qemu", "cr0.pg_without_pe_gp"): "missing: QEMU's TCG enabled paging without PE and the CPU shut down",
    ("qemu", "multiboot.info_outside_image"): "QEMU puts the Multiboot information inside the kernel's .bss",
    ("qemu", "multiboot.info_flags"): "QEMU's information lay in the kernel's .bss, which the kernel cleared",
    ("qemu", "multiboot.mem_lower"): "QEMU's information lay in the kernel's .bss, which the kernel cleared",
    ("qemu", "multiboot.cmdline_outside_image"): "QEMU's information lay in the kernel's .bss, which the kernel cleared",
    ("qemu", "paging64.nx_reserved_error"): "QEMU 7.2's TCG reports a reserved-bit #PF without P (0x8; SDM 4.7: RSVD implies P)",
    ("qemu", "paging64.pcid_unannounced_gp"): "QEMU 7.2's TCG sets CR4.PCIDE though its CPUID does not announce PCID",
    ("qemu", "realmode.gp_on_limit_taken"): "QEMU's TCG checks no data-segment limit: a real-mode access past DS's 64 KiB limit reads memory (KVM, hardware, takes the #GP)",
    ("qemu", "realmode.gp_saved_ip"): "QEMU's TCG checks no data-segment limit (no #GP, nothing saved)",
    ("qemu", "modes.clear_lme_with_paging_gp"): "QEMU 7.2's TCG lets WRMSR change EFER.LME while CR0.PG=1",
    ("qemu", "modes.clear_pg_in_64bit_gp"): "QEMU 7.2's TCG clears CR0.PG in 64-bit code (no #GP); the CPU then runs off",
    ("qemu", "modes.clear_pae_in_long_mode_gp"): "missing: QEMU ran off after clearing CR0.PG in 64-bit code",
    # --- pyvmm's software CPU (Unicorn 2.1.4): what is left to fix
    ("tcg", "realmode.gp_on_limit_taken"): "Unicorn's translator (QEMU's) checks no data-segment limit: an access past DS's 64 KiB limit reads memory; checking every access is not possible from outside the translator",
    ("tcg", "xsave.xcr0_reset_value"): "Unicorn's CPU starts with XCR0 = 3 (x87, SSE; the SDM's reset value is 1) and its register API has no XCR0 to set",
    ("tcg", "realmode.gp_saved_ip"): "Unicorn's translator checks no data-segment limit (no #GP, nothing saved)",
}
# Kernels the nested kvm_pvm KVM of our development machines cannot run, and why. It stops with
# an emulation failure (KVM_EXIT_INTERNAL_ERROR) at a 32-bit IRET at CPL0, which every 32-bit
# kernel that takes an event needs (idt64's IRETQ works).
_PVM_IRET = "kvm_pvm cannot emulate a 32-bit IRET at CPL0"
PVM_UNRUNNABLE = {
    **dict.fromkeys(("control", "cr4_reserved", "events", "eventorder", "paging", "pic_pit", "user32"), _PVM_IRET),
    "syscall64": "kvm_pvm hangs the vCPU at a SYSRET to CPL3 (and at a SYSRET with EFER.SCE=0)",
    "xsave64": "kvm_pvm cannot emulate XGETBV (an emulation failure ends the VM)",
}
# Kernels that never print DONE on a backend (a hang or a shutdown they provoke).
NO_DONE = {("qemu", "cr4_reserved"), ("qemu", "control"), ("qemu", "modes64")}

# --- the interrupt controllers (kernels lapic, ioapic): QEMU 7.2's models, where the SDM (the
# 82093AA data sheet for the IOAPIC) says otherwise. The software CPU has none left.
PVM_UNRUNNABLE.update(dict.fromkeys(("lapic", "ioapic", "gates"), _PVM_IRET))
DEVIATIONS.update({
    ("qemu", "lapic.sw_disable_masks_timer"): "QEMU 7.2's APIC leaves the LVT mask bits alone on a software "
                                               "disable (SDM 10.4.7.2 sets them all)",
    ("qemu", "lapic.sw_disable_masks_lint0"): "QEMU 7.2's APIC leaves the LVT mask bits alone on a software disable",
    ("qemu", "lapic.sw_disabled_mask_stays"): "QEMU 7.2's APIC clears an LVT mask while software-disabled "
                                              "(SDM 10.4.7.2: ignored)",
    ("qemu", "lapic.sw_enable_keeps_masks"): "QEMU 7.2's APIC never set the mask bits on the software disable",
    ("qemu", "lapic.illegal_vector_not_delivered"): "QEMU 7.2's APIC delivers a fixed IPI with a vector below 16 "
                                                    "(SDM 10.5.2: an illegal vector is not accepted)",
    ("qemu", "lapic.esr_send_illegal_vector"): "QEMU 7.2's APIC records no send illegal vector in ESR (SDM 10.5.3)",
    ("qemu", "x2apic.unannounced_msr_gp"): "QEMU 7.2's TCG reads an x2APIC MSR as 0 without announcing x2APIC",
    ("qemu", "x2apic.unannounced_enable_gp"): "QEMU 7.2's TCG accepts IA32_APIC_BASE.EXTD without announcing x2APIC",
    ("qemu", "tscdeadline.unannounced_msr_gp"): "QEMU 7.2's TCG reads IA32_TSC_DEADLINE without announcing the "
                                                "TSC-deadline timer",
    ("qemu", "ioapic.edge_once_while_high"): "QEMU 7.2's IOAPIC sends an edge-triggered pin's message at every "
                                             "assertion of its input, also one that leaves the line high "
                                             "(82093AA: on a rising edge only)",
    ("qemu", "ioapic.edge_each_rising_edge"): "QEMU 7.2's IOAPIC counted the repeated assertion before as an edge",
    ("qemu", "cr8.reserved_bits_gp"): "QEMU 7.2's TCG takes a MOV to CR8 with bits 63:4 set (SDM vol. 3 10.8.6.1: "
                                      "reserved, #GP)",
})
ON_PVM = pathlib.Path("/sys/module/kvm_pvm").exists()
# What the nested kvm_pvm KVM cannot do in a kernel it otherwise runs (only on such a host).
PVM_DEVIATIONS = {("kvm", "paging64.invpcid_unannounced_ud"):
                  "missing: kvm_pvm cannot emulate INVPCID to raise its #UD (an emulation failure ends the VM)"}
if ON_PVM:
    DEVIATIONS.update(PVM_DEVIATIONS)
    NO_DONE.add(("kvm", "paging64"))

_CHECK_LINE = re.compile(r"^\s*(?:\d+:\s*)?CHECK(?:64)?\s+([\w.]+),", re.M)


def declared_checks(kernel: str) -> list[str]:
    return list(dict.fromkeys(_CHECK_LINE.findall((KERNEL_DIR / f"{kernel}.S").read_text())))


def skip_reason(backend: str, kernel: str) -> str | None:
    problem = qemu_problem() if backend == "qemu" else kvm_problem() if backend == "kvm" else None
    if problem:
        return problem
    if backend == "kvm" and kernel in PVM_UNRUNNABLE and ON_PVM:
        return PVM_UNRUNNABLE[kernel]
    return None
