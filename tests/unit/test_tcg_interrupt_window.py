"""Interrupt-window exits on the software CPU's engine (accel/tcg/interrupt_window.py): with an
external interrupt requested, the engine stops at the first instruction boundary where IF=1 and
no STI shadow is active, and nowhere else."""

from __future__ import annotations

import pytest

U = pytest.importorskip("unicorn")
import unicorn.x86_const as X  # noqa: E402

from pyvmm.accel.tcg import helper_patch, interrupt_window  # noqa: E402
from pyvmm.accel.tcg.engine_state import STOP_ERROR, EngineControl, engine_offsets  # noqa: E402

CODE = 0x1000


class _Engine:
    def __init__(self, uc, engine) -> None:
        self.uc, self.engine = uc, engine
        self.stops: list[int] = []

    def request_stop(self) -> None:
        self.stops.append(self.uc.reg_read(X.UC_X86_REG_RIP) - CODE)
        self.engine.request_stop()


class _Cpu:
    """What interrupt_window's hook uses of a TcgVcpu."""
    lapic = None

    def __init__(self, engine: _Engine) -> None:
        self.engine, self.stats, self.halted, self.window_exit = engine, {"interrupts": 0}, False, False


def _window_after(code: bytes, rflags: int) -> tuple[list[int], int | None, int]:
    """Run `code` (ending in HLT) with an external interrupt requested: where the engine stopped
    (offsets into the code), emu_start's error, and the requests left afterwards."""
    assert interrupt_window.install(engine_offsets())
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    offsets = engine_offsets()
    engine = EngineControl(uc, offsets)
    engine.stop_between_instructions()
    uc.mem_map(CODE, 0x1000)
    uc.mem_map(0x8000, 0x1000)
    uc.mem_write(CODE, code)
    uc.reg_write(X.UC_X86_REG_RSP, 0x9000)
    uc.reg_write(X.UC_X86_REG_RFLAGS, rflags)
    requests = interrupt_window.InterruptRequests(engine.cpu_address, offsets.exit_request)
    cpu = _Cpu(_Engine(uc, engine))
    requests.request(hard=True, nmi=False)
    helper_patch.running.vcpu = cpu
    error = None
    try:
        uc.emu_start(CODE, 0xFFFF_FFFF_FFFF_FFFF)
    except U.UcError as exc:
        error = exc.errno
    finally:
        helper_patch.running.vcpu = None
        left = requests.clear()
    assert cpu.window_exit == bool(cpu.engine.stops)
    return cpu.engine.stops, error, left


@pytest.mark.parametrize("name, code, rflags, where", [
    # IF=0: STI's shadow covers the NOP after it; the window opens after that NOP
    ("sti shadow", bytes.fromhex("fb" "90" "90" "f4"), 0x2, 2),
    # IF=1 from the start: taken before the first instruction
    ("already open", bytes.fromhex("90" "90" "f4"), 0x202, 0),
    # POPF setting IF has no shadow: taken right after it
    ("popf", bytes.fromhex("68" "02020000" "9d" "90" "f4"), 0x2, 6),
])
def test_the_engine_stops_where_the_window_opens(name, code, rflags, where):
    stops, error, left = _window_after(code, rflags)
    assert (stops, error, left) == ([where], STOP_ERROR, 0), name


def test_no_stop_while_interrupts_stay_disabled():
    stops, error, left = _window_after(bytes.fromhex("90" "90" "f4"), 0x2)
    # ended by the HLT, the request still there (the caller clears it after every slice)
    assert stops == [] and error is None and left == interrupt_window.CPU_INTERRUPT_HARD


def test_the_request_offset_follows_qemus_cpustate_layout():
    # bool exit_request, bool in_exclusive_context, u32 cflags_next_tb, u32 interrupt_request
    assert interrupt_window.interrupt_request_offset(21) == 28


class _TakingCpu(_Cpu):
    """A vCPU whose own I/O asked for the window: it hands the engine `vector` there."""

    def __init__(self, engine: _Engine, vector: int) -> None:
        super().__init__(engine)
        self.vector, self.taken = vector, 0

    def take_at_window(self) -> int | None:
        self.taken += 1
        return self.vector


def test_a_vector_taken_at_the_window_is_delivered_there_without_a_stop():
    """take_at_window: the engine delivers the vector through the IDT at the boundary where the
    window opened (after `sti; nop`), and the slice goes on into the handler."""
    from pyvmm.accel.tcg.private_state import _probe_uc

    assert interrupt_window.install(engine_offsets())
    idt, handler, code, vector = 0x5000, 0x6000, 0x7000, 0x40
    uc = _probe_uc()  # long mode, CPL 0, a flat 64-bit code segment at 0x08, the first 2 MiB mapped
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    engine = EngineControl(uc, engine_offsets())
    engine.stop_between_instructions()
    gate = (handler & 0xFFFF) | 0x08 << 16 | 0x8E << 40 | (handler >> 16 & 0xFFFF) << 48
    uc.mem_write(idt + 16 * vector, gate.to_bytes(8, "little") + (handler >> 32).to_bytes(8, "little"))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, idt, 16 * 256 - 1, 0))
    uc.mem_write(handler, bytes.fromhex("f4"))                   # hlt
    uc.mem_write(code, bytes.fromhex("fb" "90" "90" "f4"))       # sti; nop; nop; hlt
    uc.reg_write(X.UC_X86_REG_RFLAGS, 0x2)
    rsp = uc.reg_read(X.UC_X86_REG_RSP)
    requests = interrupt_window.InterruptRequests(engine.cpu_address, engine_offsets().exit_request)
    cpu = _TakingCpu(_Engine(uc, engine), vector)
    requests.request(hard=True, nmi=False)
    helper_patch.running.vcpu = cpu
    try:
        uc.emu_start(code, 0xFFFF_FFFF_FFFF_FFFF)  # ends at the handler's HLT
    finally:
        helper_patch.running.vcpu = None
        requests.clear()
    assert (cpu.taken, cpu.engine.stops, cpu.window_exit) == (1, [], False)
    assert uc.reg_read(X.UC_X86_REG_RIP) == handler + 1
    frame_rip = int.from_bytes(uc.mem_read(rsp - 40, 8), "little")  # RIP CS RFLAGS RSP SS pushed
    assert frame_rip == code + 2, "delivered after the NOP in STI's shadow, before the next one"
