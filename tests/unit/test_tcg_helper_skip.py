"""The machine-code skips in front of the patched MSR/CR helpers (helper_patch.branches,
msr_cr_policy.*_skip): CR2/CR3 and the hot MSRs reach the helper with no Python call, CR8 and
every other case still go through the Python filter."""

from __future__ import annotations

import struct

import pytest

from pyvmm.accel.tcg import helper_patch
from pyvmm.accel.tcg.msr_cr_policy import rdmsr_skip, read_cr_skip, write_cr_skip


def test_every_branch_lands_the_distance_past_the_sequence():
    for make in (read_cr_skip, write_cr_skip, rdmsr_skip):
        code = make(100)
        at, targets = 0, []
        while (at := code.find(b"\x0f", at)) >= 0:
            if code[at + 1] in (helper_patch.JE, helper_patch.JNE, helper_patch.JBE):
                targets.append(at + 6 + struct.unpack("<i", code[at + 2:at + 6])[0])
                at += 6
            else:
                at += 1
        assert targets and set(targets) == {len(code) + 100}, make.__name__


U = pytest.importorskip("unicorn")
import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg import msr_cr_policy  # noqa: E402
from pyvmm.accel.tcg.private_state import _probe_uc  # noqa: E402

CODE = 0x30000


class _Lapic:
    apic_base = 0xFEE00900

    def read(self, offset: int, size: int) -> bytes:
        return (0x50).to_bytes(size, "little")  # TPR 0x50: CR8 reads 5


class _EveryFeature:
    def lookup(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        return (0xFFFFFFFF,) * 4


class _Vcpu:
    lapic, cpuid_table, long_mode = _Lapic(), _EveryFeature(), True


class _CountingRunning:
    """Stands in for helper_patch.running: counts the filters' looks at the running vCPU."""

    def __init__(self) -> None:
        self.looks = 0

    @property
    def vcpu(self):
        self.looks += 1
        return _Vcpu()


def _looks(code: bytes, monkeypatch) -> tuple[int, object]:
    assert msr_cr_policy.install()
    uc = _probe_uc()
    uc.mem_write(CODE, code + b"\xf4")  # ... ; hlt
    running = _CountingRunning()
    monkeypatch.setattr(helper_patch, "running", running)
    uc.emu_start(CODE, CODE + len(code))
    return running.looks, uc


def test_cr2_cr3_and_hot_msrs_reach_the_helper_without_python(monkeypatch):
    code = bytes.fromhex("0f20d8" "0f22d8"      # mov %cr3,%rax; mov %rax,%cr3
                         "0f20d0" "0f22d0"      # mov %cr2,%rax; mov %rax,%cr2
                         "b9800000c0" "0f32"    # rdmsr EFER
                         "b9020100c0" "0f32")   # rdmsr KERNEL_GS_BASE
    looks, uc = _looks(code, monkeypatch)
    assert looks == 0
    assert uc.reg_read(X.UC_X86_REG_RAX) | uc.reg_read(X.UC_X86_REG_RDX) << 32 == 0  # (never written)


def test_cr8_cr4_and_other_msrs_still_ask_python(monkeypatch):
    code = bytes.fromhex("440f20c0")            # mov %cr8,%rax: the APIC's TPR
    looks, uc = _looks(code, monkeypatch)
    assert looks == 1 and uc.reg_read(X.UC_X86_REG_RAX) == 5
    looks, uc = _looks(bytes.fromhex("0f20e0" "0f22e0"), monkeypatch)  # mov %cr4,%rax; mov %rax,%cr4
    assert looks == 1  # the write (reserved bits), not the read
    looks, uc = _looks(bytes.fromhex("b91b000000" "0f32"), monkeypatch)  # rdmsr IA32_APIC_BASE
    assert looks == 1 and uc.reg_read(X.UC_X86_REG_RAX) == _Lapic.apic_base
