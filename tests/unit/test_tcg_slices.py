"""The software CPU's time slices: Unicorn stopped between two instructions, without losing hooks.

Each guest loop below keeps invariants that one re-executed, skipped or resumed-elsewhere
instruction breaks. It is stopped hundreds of times, from another thread at random points
(the slice timer's deadline) or from inside a device access (the kick of a raised
interrupt), and every run resumes where the last one stopped. engine_state.py says what
Unicorn's own uc_emu_stop() gets wrong in each case.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

U = pytest.importorskip("unicorn")
import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg.engine_state import STOP_ERROR, EngineControl, engine_offsets  # noqa: E402
from pyvmm.accel.tcg.slice_timer import SliceTimer  # noqa: E402

CODE, DATA = 0x1000, 0x8000
SLICES = 300


def _uc(code: bytes):
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.ctl_exits_enabled(True)  # as TcgVcpu runs it: no `until`
    uc.ctl_set_exits([])
    engine = EngineControl(uc, engine_offsets())
    engine.stop_between_instructions()  # before anything is translated
    uc.mem_map(CODE, 0x1000)
    uc.mem_map(DATA, 0x1000)
    uc.mem_write(CODE, code)
    uc.reg_write(X.UC_X86_REG_RBX, DATA)
    return uc, engine


def _run_in_slices(uc, engine, slices: int = SLICES) -> int:
    """Run the endless loop at CODE in `slices` slices, each stopped from another thread ~100 us
    in (again every ~100 us: a stop that arrives before emu_start began is lost); returns how
    many ended with the stop error."""
    running = threading.Event()
    done = threading.Event()
    stopped = 0

    def stopper():
        while not done.is_set():
            if running.wait(0.05):
                time.sleep(0.0001)
                engine.request_stop()

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    rip = CODE
    try:
        for _ in range(slices):
            running.set()
            try:
                uc.emu_start(rip, 0xFFFF_FFFF_FFFF_FFFF)
            except U.UcError as exc:
                assert exc.errno == STOP_ERROR, exc
                stopped += 1
            finally:
                running.clear()
            rip = uc.reg_read(X.UC_X86_REG_RIP)
    finally:
        done.set()
        thread.join()
    return stopped


def test_engine_offsets_are_found_and_verified():
    offsets = engine_offsets()
    assert offsets.invalid_error >= 0 and offsets.cpu >= 0


def test_a_stop_never_runs_a_read_modify_write_twice():
    # loop: lock xadd %rax,(%rbx) (rax = 1 before) ; inc %rcx ; jmp loop
    uc, engine = _uc(bytes.fromhex("b801000000" "f0480fc103" "48ffc1" "ebf1"))
    assert _run_in_slices(uc, engine) == SLICES
    memory = struct.unpack("<Q", uc.mem_read(DATA, 8))[0]
    rcx = uc.reg_read(X.UC_X86_REG_RCX)
    rip = uc.reg_read(X.UC_X86_REG_RIP)
    # the memory count is ahead of rcx only between the xadd and the inc
    assert memory - rcx == (1 if rip == CODE + 10 else 0), (memory, rcx, hex(rip))


def test_a_stop_never_skips_the_cpuid_and_syscall_hooks():
    # loop: inc %rcx ; cpuid ; inc %rdx ; syscall ; jmp loop  (the hooks count, and leave RCX/RDX alone)
    uc, engine = _uc(bytes.fromhex("48ffc1" "0fa2" "48ffc2" "0f05" "ebf4"))
    seen = {"cpuid": 0, "syscall": 0}

    def cpuid(uc, _):
        seen["cpuid"] += 1
        return 1  # handled: Unicorn's own CPUID would overwrite RCX/RDX

    def syscall(uc, _):
        seen["syscall"] += 1

    # pyvmm's hook order: Unicorn walks CPUID and SYSCALL hooks only up to a pending uc_emu_stop()
    uc.hook_add(U.UC_HOOK_INSN, lambda uc, port, size, _: 0, None, 1, 0, X.UC_X86_INS_IN)
    uc.hook_add(U.UC_HOOK_INSN, lambda uc, port, size, value, _: None, None, 1, 0, X.UC_X86_INS_OUT)
    uc.hook_add(U.UC_HOOK_INSN, cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
    uc.hook_add(U.UC_HOOK_INSN, syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
    assert _run_in_slices(uc, engine) == SLICES
    rcx, rdx = uc.reg_read(X.UC_X86_REG_RCX), uc.reg_read(X.UC_X86_REG_RDX)
    # blocks start at the loop and after the SYSCALL: both between iterations
    assert seen == {"cpuid": rcx, "syscall": rcx} and rdx == rcx, (seen, rcx, rdx)


MMIO = 0x10000


def _stop_from_mmio_writes(uc, engine, first: int = 1) -> list[int]:
    """Guest writes to MMIO (from the `first`) request a stop from inside the access, as a device
    raising an interrupt (the slice timer's kick) does; returns the list the writes are counted in."""
    writes = []

    def on_write(uc, offset, size, value, _):
        writes.append(value)
        if len(writes) >= first:
            engine.request_stop()

    uc.mmio_map(MMIO, 0x1000, None, None, on_write, None)
    return writes


def _run_until_stopped(uc, slices: int = SLICES) -> None:
    rip = CODE
    for _ in range(slices):
        with pytest.raises(U.UcError) as stopped:
            uc.emu_start(rip, 0xFFFF_FFFF_FFFF_FFFF)
        assert stopped.value.errno == STOP_ERROR
        rip = uc.reg_read(X.UC_X86_REG_RIP)


def test_a_stop_from_a_device_write_lets_the_write_happen_once():
    # loop: mov %eax,(MMIO) ; inc %rcx ; jmp loop
    uc, engine = _uc(bytes.fromhex("89042500000100" "48ffc1" "ebf4"))
    writes = _stop_from_mmio_writes(uc, engine)
    _run_until_stopped(uc)
    assert len(writes) == SLICES == uc.reg_read(X.UC_X86_REG_RCX)


def test_a_stop_from_a_device_write_keeps_the_cpuid_and_syscall_hooks():
    # loop: mov %eax,(MMIO) ; cpuid ; syscall ; jmp loop
    uc, engine = _uc(bytes.fromhex("89042500000100" "0fa2" "0f05" "ebf3"))
    _stop_from_mmio_writes(uc, engine)
    seen = []
    uc.hook_add(U.UC_HOOK_INSN, lambda uc, port, size, _: 0, None, 1, 0, X.UC_X86_INS_IN)
    uc.hook_add(U.UC_HOOK_INSN, lambda uc, port, size, value, _: None, None, 1, 0, X.UC_X86_INS_OUT)
    uc.hook_add(U.UC_HOOK_INSN, lambda uc, _: (seen.append("cpuid"), 1)[1], None, 1, 0, X.UC_X86_INS_CPUID)
    uc.hook_add(U.UC_HOOK_INSN, lambda uc, _: seen.append("syscall"), None, 1, 0, X.UC_X86_INS_SYSCALL)
    _run_until_stopped(uc)
    assert seen == ["cpuid", "syscall"] * SLICES


def test_a_stop_after_a_rip_write_from_a_hook_resumes_at_the_next_block():
    # loop: inc %rcx ; int3 (the hook writes RIP, as exception delivery does) ; inc %rdx ; jmp a
    #    a: inc %r8 ; mov %eax,(MMIO) (requests the stop) ; jmp b
    #    b: inc %r9 ; jmp loop   (chained blocks: Unicorn writes no RIP from `inc %rdx` to b)
    uc, engine = _uc(bytes.fromhex("48ffc1" "cc" "48ffc2" "eb00" "49ffc0" "89042500000100" "eb00" "49ffc1" "ebe6"))
    _stop_from_mmio_writes(uc, engine, first=2)  # one whole turn first: blocks are chained when they ran once

    def on_interrupt(uc, vector, _):
        uc.reg_write(X.UC_X86_REG_RIP, uc.reg_read(X.UC_X86_REG_RIP))
        engine.forget_pc_write()

    uc.hook_add(U.UC_HOOK_INTR, on_interrupt)
    _run_until_stopped(uc)
    counts = [uc.reg_read(r) for r in (X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_R8, X.UC_X86_REG_R9)]
    assert counts == [SLICES + 1, SLICES + 1, SLICES + 1, SLICES], counts  # stopped at b each time


def test_a_stop_on_an_idle_engine_is_harmless():
    uc, engine = _uc(bytes.fromhex("48ffc1" "48ffc1" "f4"))  # inc ; inc ; hlt
    engine.request_stop()
    uc.emu_start(CODE, 0xFFFF_FFFF_FFFF_FFFF)  # runs to the HLT: emu_start forgets an old stop
    assert uc.reg_read(X.UC_X86_REG_RCX) == 2


class _Stops:
    def __init__(self):
        self.calls = 0
        self.event = threading.Event()

    def __call__(self):
        self.calls += 1
        self.event.set()


def test_slice_timer_stops_a_slice_at_its_deadline_and_not_after_it_ended():
    timer, stop = SliceTimer(), _Stops()
    try:
        timer.begin(stop, 0.01)
        assert stop.event.wait(2)
        assert timer.end() is True
        calls = stop.calls
        timer.begin(stop, 10)
        time.sleep(0.01)
        assert timer.end() is False  # a slice that ended by itself (HLT) was not stopped
        time.sleep(0.01)
        assert stop.calls == calls
    finally:
        timer.close()


def test_slice_timer_kick_stops_at_once_and_repeats_from_the_deadline_until_the_slice_returns():
    timer, stop = SliceTimer(), _Stops()
    try:
        timer.begin(stop, 0.3)
        timer.kick()
        assert stop.calls == 1
        time.sleep(0.1)  # a kick leaves the timer thread asleep: no repeat before the deadline
        assert stop.calls == 1
        time.sleep(0.4)  # the first stop may have been lost: repeated from the deadline on
        assert stop.calls > 1
        assert timer.end() is True
        calls = stop.calls
        time.sleep(0.01)
        timer.kick()  # no slice running: nothing to stop
        assert stop.calls == calls
    finally:
        timer.close()


def test_slice_timer_between_slices_keeps_each_slices_own_deadline():
    timer, stop = SliceTimer(), _Stops()
    try:
        timer.begin(stop, 0.2)
        assert timer.end() is False  # ended early: the thread sleeps on to that deadline
        timer.begin(stop, 1.5)       # later than where the thread sleeps: no wake-up needed
        time.sleep(0.5)
        assert stop.calls == 0       # the old deadline passed: this slice goes on
        assert stop.event.wait(3)
        assert timer.end() is True and timer.expired
        stop.event.clear()
        calls = stop.calls
        timer.begin(stop, 10)
        assert timer.end() is False
        timer.begin(stop, 0.02)      # earlier than where the thread sleeps: it must wake for it
        assert stop.event.wait(2)    # (the thread repeats a stop until end(): at least one)
        assert stop.calls > calls
        assert timer.end() is True and timer.expired
        timer.begin(stop, 10)
        timer.kick()
        assert timer.end() is True and not timer.expired  # a kick is no expiry
    finally:
        timer.close()
