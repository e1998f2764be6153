"""helper_patch's relocated `je rel32` (helper_sysret's prologue) and the SYSRET guard's branches."""

import struct

from pyvmm.accel.tcg.helper_patch import PROLOGUES, RELOCATED_JE, _displaced
from pyvmm.accel.tcg.msr_cr_policy import sysret_guard


def test_relocated_je_jumps_to_the_original_destination_and_resumes_behind_the_prologue():
    prologue = PROLOGUES["helper_sysret_x86_64"]
    at = RELOCATED_JE["helper_sysret_x86_64"]
    helper = 0x7F00_0000_1000
    code = _displaced(prologue, helper, at)
    assert code[:at] == prologue[:at]                       # the position-independent part, as is
    assert code[at] == 0x75 and code[at + 1] == 14          # jne over the far jump
    far_target = struct.unpack("<Q", code[at + 2 + 6:at + 2 + 14])[0]
    assert far_target == helper + at + 6 + struct.unpack("<i", prologue[at + 2:at + 6])[0]
    resume = struct.unpack("<Q", code[-8:])[0]
    assert resume == helper + len(prologue)


def test_plain_prologue_runs_as_is_then_resumes():
    prologue = PROLOGUES["helper_rdmsr_x86_64"]
    code = _displaced(prologue, 0x1000, None)
    assert code.startswith(prologue) and struct.unpack("<Q", code[-8:])[0] == 0x1000 + len(prologue)


def test_sysret_guard_branches_land_at_its_end_or_jump_over_the_passthrough():
    guard = sysret_guard(41)
    end = len(guard)
    for at in (3, 12, 30):                                  # jne, je, jbe: run the helper
        assert guard[at] in (0x75, 0x74, 0x76) and at + 2 + guard[at + 1] == end
    assert guard[-2:] == bytes([0xEB, 41])                  # else over the passthrough, to the #GP
