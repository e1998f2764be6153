"""Instructions KVM cannot emulate on a software-assisted host, through real guests.

assists.S runs popcnt and verw at CPL0 and reports each result (guests/assists.S defines
the report format). The expected values are the architecture's (Intel SDM: POPCNT, VERW,
#PF/#GP), the same on both backends: on kvm_pvm pyvmm completes those instructions itself
(accel/kvm/assist.py), on the software CPU and on a hardware-assisted KVM the CPU runs
them, and the results must not differ. unassisted.S runs an instruction pyvmm does not
complete (lock cmpxchg16b): on kvm_pvm the VM stops with one line naming the instruction,
RIP and the kernel symbol from --system-map; anywhere else it just runs.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

from helpers.reporting import KVM_GUESTS as GUESTS, run_reporting
from pyvmm.guests import build_source

ZF, CF = 0x40, 0x01
KVM_PVM = pathlib.Path("/sys/module/kvm_pvm").exists()   # the host whose KVM fails these (ENVIRONMENT.md)


def _value(lo: int, hi: int) -> int:
    return lo | hi << 32


# (tag, A, B) the architecture gives for each scenario of assists.S
EXPECTED = [
    (1, 32, 0),                                  # popcnt %rbx,%rax: 32 bits; OF SF AF PF CF cleared
    (2, 0, ZF),                                  # popcnt %ebx,%eax of 0: ZF, and RAX zero-extended
    (3, 0x1111222233330002, 0),                  # popcnt %bx,%ax keeps RAX[63:16]
    (4, 32, 0),                                  # RIP-relative qword
    (5, 3, 0),                                   # 4(%rdi,%rcx,4): table[2] = 7
    (6, 0xFFFFFFFFFFFF0001, 0),                  # %fs:4 (FS.base = table): 0x0001, R11[63:16] kept
    (0x80 | 14, 0x200010, 0), (0xF0, 0, 0),      # not-present page: #PF(0), CR2, RIP of the popcnt
    (0x80 | 13, 0x200010, 0), (0xF0, 0, 0),      # non-canonical: #GP(0); CR2 untouched since the #PF
    (0x80 | 14, 0x202000, 0), (0xF0, 0, 0),      # across into an unmapped page: CR2 = its first byte
    (10, 0, ZF | CF),                            # verw 0x18 (read/write data): ZF; CF untouched
    (11, 0, CF),                                 # verw 0x10 (code): no ZF
    (12, 0, CF),                                 # verw 0x20 (read-only data)
    (13, 0, CF),                                 # verw 0x1b (RPL 3 > DPL 0)
    (14, 0, ZF | CF),                            # verw 0x2b (DPL 3 data, RPL 3)
    (15, 0, ZF),                                 # verw of a word in memory (0x18)
    (0xFF, 0, 0),
]


def test_popcnt_and_verw_give_the_architectural_results(accel):
    outcome, reports, vcpu = run_reporting("assists.S", accel, 4)
    assert outcome.reason == "debug-exit" and outcome.status == 1, outcome
    assert [(tag, _value(lo, hi), b) for tag, lo, hi, b in reports] == EXPECTED
    if accel == "kvm":
        # completed by pyvmm where KVM could not emulate them; on other hosts nothing triggers
        assert vcpu.assists == ({"popcnt": 9, "verw": 6} if KVM_PVM else {})


def test_an_instruction_pyvmm_cannot_complete_is_one_line_with_the_symbol(pyvmm, accel, tmp_path):
    elf = build_source(GUESTS / "unassisted.S", 64)
    system_map = tmp_path / "System.map"
    system_map.write_text(subprocess.run(["nm", "-n", str(elf)], check=True, capture_output=True, text=True).stdout)
    symbols = {name: int(address, 16) for address, _, name in map(str.split, system_map.read_text().splitlines())}
    result = pyvmm("run", "--accel", accel, "--kernel", str(elf), "--system-map", str(system_map), timeout=120)
    if accel == "tcg" or not KVM_PVM:
        assert result.returncode == 0x21 << 1 | 1, result.stderr
        return
    assert result.returncode == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    match = re.fullmatch(r"pyvmm: vCPU 0: KVM could not emulate lock cmpxchg16b at rip=(0x[0-9a-f]+) "
                         r"\(cmpxchg16b_here\+(0x[0-9a-f]+)\) cs=0x10 \(64-bit mode, CPL0\) code: f0 48 0f c7 0f",
                         lines[0])
    assert match, lines[0]
    rip, offset = (int(g, 16) for g in match.groups())
    # movl, movl, movl, movl (5 bytes each) and a RIP-relative lea (7) precede it
    assert offset == 27 and rip == symbols["cmpxchg16b_here"] + offset
