"""x86 conformance: the test kernels of tests/conformance/kernels on pyvmm and on QEMU.

Each kernel computes its expectations from the Intel SDM (or the Multiboot specification) and
prints ok / FAIL per check (helpers/conformance.py). Every backend must pass every check except
the deviations listed below, each with its reason; a listed deviation must still deviate
(strictly), so a fix makes this test fail until the entry goes. QEMU (TCG) is the oracle where
it is right; where it is wrong the SDM decides, and its entry here says so.
"""

from __future__ import annotations

import pathlib
import re

import pytest
from helpers import conformance as C

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
    ("qemu", "multiboot.cmdline_outside_image"): "QEMU puts the command line inside the kernel's .bss",
    ("qemu", "multiboot.mem_lower"): "the kernel's .bss clearing overwrote QEMU's misplaced information",
    # --- pyvmm's software CPU (Unicorn 2.1.4): what is left to fix
    ("tcg", "msr.apic_base_enabled"): "Unicorn reads IA32_APIC_BASE as 0 and 2.1.4 has no RDMSR hook",
    ("tcg", "msr.apic_base_bsp"): "Unicorn reads IA32_APIC_BASE as 0 and 2.1.4 has no RDMSR hook",
    ("tcg", "msr.apic_base_address"): "Unicorn reads IA32_APIC_BASE as 0 and 2.1.4 has no RDMSR hook",
    ("tcg", "msr.efer_reserved_bit_gp"): "Unicorn's WRMSR checks no reserved bits (no WRMSR hook in 2.1.4)",
    ("tcg", "msr.rdmsr_unknown_gp"): "Unicorn reads an unknown MSR as 0 (no RDMSR hook in 2.1.4)",
    ("tcg", "msr.wrmsr_unknown_gp"): "Unicorn drops a write to an unknown MSR (no WRMSR hook in 2.1.4)",
    ("tcg", "cr4.lam_sup_unannounced_gp"): "Unicorn's MOV to CR4 checks no reserved bits",
    ("tcg", "cr4.reserved_bit15_gp"): "Unicorn's MOV to CR4 checks no reserved bits",
    ("tcg", "cr4.reserved_bit31_gp"): "Unicorn's MOV to CR4 checks no reserved bits",
    ("tcg", "cr0.nw_without_cd_gp"): "Unicorn's MOV to CR0 checks no invalid combinations",
    ("tcg", "cr0.pg_without_pe_gp"): "missing: Unicorn enabled paging without PE and the CPU shut down",
    ("tcg", "order.sti_shadow_int.count"): "pending interrupts are injected between slices: STI does not end one",
    ("tcg", "order.sti_shadow_int.second"): "pending interrupts are injected between slices: STI does not end one",
    ("tcg", "order.sti_nop_int.first"): "pending interrupts are injected between slices: STI does not end one",
    ("tcg", "order.sti_nop_int.second"): "pending interrupts are injected between slices: STI does not end one",
    ("tcg", "order.taken_after_sti"): "pending interrupts are injected between slices: STI does not end one",
    ("tcg", "nested.np_saved_eip"): "a #NP raised delivering INT n saves the next EIP (a fault saves the INT's)",
}
# Kernels the nested kvm_pvm KVM of our development machines cannot run: it fails to emulate a
# 32-bit IRET at CPL0 (KVM_EXIT_INTERNAL_ERROR), which every kernel that takes an event needs.
PVM_UNRUNNABLE = {"control", "cr4_reserved", "events"}
# Kernels that never print DONE on a backend (a hang or a shutdown they provoke).
NO_DONE = {("qemu", "cr4_reserved"), ("qemu", "control"), ("tcg", "control")}

_CHECK_LINE = re.compile(r"^\s*(?:\d+:\s*)?CHECK\s+([\w.]+),", re.M)


def declared_checks(kernel: str) -> list[str]:
    return _CHECK_LINE.findall((C.KERNEL_DIR / f"{kernel}.S").read_text())


def _skip_reason(backend: str, kernel: str) -> str | None:
    problem = C.qemu_problem() if backend == "qemu" else C.kvm_problem() if backend == "kvm" else None
    if problem:
        return problem
    if backend == "kvm" and kernel in PVM_UNRUNNABLE and pathlib.Path("/sys/module/kvm_pvm").exists():
        return "kvm_pvm cannot emulate a 32-bit IRET at CPL0"
    return None


@pytest.mark.parametrize("backend", C.BACKENDS)
@pytest.mark.parametrize("kernel", C.kernels())
def test_kernel(kernel: str, backend: str) -> None:
    reason = _skip_reason(backend, kernel)
    if reason:
        pytest.skip(reason)
    run = C.run(kernel, backend, timeout=30 if (backend, kernel) in NO_DONE else 120)
    problems = []
    for check in declared_checks(kernel):
        outcome = run.outcome(check)
        deviation = DEVIATIONS.get((backend, check))
        if deviation is None and outcome not in ("ok", "skip"):
            problems.append(f"{check}: {outcome} {run.results.get(check, ('', ''))[1]}")
        elif deviation is not None and outcome == "ok":
            problems.append(f"{check}: passes now; drop its deviation ({deviation})")
    expect_done = (backend, kernel) not in NO_DONE
    if run.done != expect_done:
        problems.append("the kernel " + ("did not reach DONE" if expect_done else "reached DONE now: update NO_DONE"))
    assert not problems, "\n".join(problems) + "\n--- output ---\n" + run.output[-3000:]


def test_every_deviation_names_a_declared_check() -> None:
    declared = {check for kernel in C.kernels() for check in declared_checks(kernel)}
    assert not {check for _, check in DEVIATIONS} - declared
