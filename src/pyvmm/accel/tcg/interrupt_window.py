"""Interrupt-window exits: the engine stops at the first instruction boundary where a pending
external interrupt can be taken (KVM's request_interrupt_window, for the software CPU).

The scheduler injects external interrupts between slices. One that is pending while the guest
cannot take it (IF=0, or the one-instruction shadow of STI or MOV SS) must be taken as soon as
that ends: after `sti; nop` and before the instruction after the NOP (SDM vol. 3 6.8.3). Polling
with short slices is far too coarse for that. The engine still has QEMU's own check, run at
every translation-block boundary (QEMU ends a block after STI, MOV SS, POPF and IRET, and runs
the shadowed instruction as a block of its own): a CPU_INTERRUPT_HARD request in the CPUState's
interrupt_request is taken when IF=1 and no shadow is active, by calling
do_interrupt_x86_hardirq(env, 0, 1). Unicorn leaves the request unused and has no PIC behind it
(the vector would be 0); pyvmm patches that function's entry (helper_patch.py) so that a
request pyvmm made stops the slice there instead, and the scheduler injects the real vector.
A request the running vCPU's own I/O made (vcpu.wait_for_window: a UART raising its interrupt
inside the guest's port lock, say) is served right there: the LAPIC acknowledges, and the
engine delivers that vector at the very boundary the scheduler would have, without a slice
end (one per console line's load, each a round of the scheduler).

A pending NMI that is blocked by an NMI in service (until the next IRET) is handed to the
engine the same way, as CPU_INTERRUPT_NMI, which QEMU delivers itself when IRET unblocks it.

The request is per CPUState, which every vCPU of the one engine shares: it is set for a slice
and cleared after it. interrupt_request follows exit_request in QEMU's CPUState (bool
exit_request, bool in_exclusive_context, u32 cflags_next_tb, u32 interrupt_request); a probe
run verifies the offset and the STI shadow before the exits are used.
"""

from __future__ import annotations

import ctypes
import logging
import threading

from . import helper_patch
from .helper_patch import HANDLED, PASS, PASS_WITH_ARG1

log = logging.getLogger(__name__)

HARDIRQ = "do_interrupt_x86_hardirq_x86_64"
CPU_INTERRUPT_HARD, CPU_INTERRUPT_NMI = 0x0002, 0x0200
NMI_VECTOR = 2
_probe_lock = threading.Lock()
_available: bool | None = None


def interrupt_request_offset(exit_request: int) -> int:
    """CPUState.interrupt_request from CPUState.exit_request (see the module docstring)."""
    cflags_next_tb = (exit_request + 2 + 3) & ~3
    return cflags_next_tb + 4


def _on_hardirq(env: int, vector: int, is_hw: int) -> tuple[int, int]:
    """The engine found the window of a requested event open (inside the CPU loop): end the
    slice there for a maskable interrupt, which the scheduler then injects; let the engine
    deliver a requested NMI itself (vector 2, blocking NMIs until IRET)."""
    vcpu = getattr(helper_patch.running, "vcpu", None)
    if vcpu is None or not is_hw & 0xFFFFFFFF:
        return PASS, 0
    vector &= 0xFFFFFFFF
    if vector == NMI_VECTOR:
        if vcpu.lapic is not None:
            vcpu.lapic.take_nmi()
        vcpu.stats["interrupts"] += 1
        vcpu.halted = False
        return PASS, 0
    if vector == 0:  # CPU_INTERRUPT_HARD: Unicorn has no PIC to ask for the vector
        take = getattr(vcpu, "take_at_window", None)
        now = take() if take is not None else None
        if now is not None:
            return PASS_WITH_ARG1, now  # delivered right here by the engine: the slice goes on
        vcpu.window_exit = True
        vcpu.engine.request_stop()
        return HANDLED, 0
    return PASS, 0


class InterruptRequests:
    """The interrupt_request word of one engine's CPUState."""

    def __init__(self, cpu_address: int, exit_request: int) -> None:
        self._word = ctypes.c_uint32.from_address(cpu_address + interrupt_request_offset(exit_request))

    def request(self, *, hard: bool, nmi: bool) -> None:
        self._word.value |= (CPU_INTERRUPT_HARD if hard else 0) | (CPU_INTERRUPT_NMI if nmi else 0)

    def clear(self) -> int:
        """Drop pyvmm's requests; returns the ones the engine had not taken."""
        value = self._word.value
        self._word.value = value & ~(CPU_INTERRUPT_HARD | CPU_INTERRUPT_NMI)
        return value & (CPU_INTERRUPT_HARD | CPU_INTERRUPT_NMI)


class _ProbeEngine:
    """Stands in for a vCPU's engine during the probe: records where the window opened."""

    def __init__(self, uc, engine) -> None:
        self.uc, self.engine = uc, engine
        self.seen: list[int] = []

    def request_stop(self) -> None:
        import unicorn.x86_const as X

        self.seen.append(self.uc.reg_read(X.UC_X86_REG_RIP))
        self.engine.request_stop()


class _ProbeCpu:
    lapic = None

    def __init__(self, engine: _ProbeEngine) -> None:
        self.engine, self.stats, self.halted, self.window_exit = engine, {"interrupts": 0}, False, False


# sti ; nop ; nop ; hlt  -- with IF=0 and a request: the window opens after the first NOP
_PROBE_CODE = bytes.fromhex("fb" "90" "90" "f4")
_PROBE_BASE = 0x1000


def _probe(engine_offsets) -> bool:
    import unicorn as U
    import unicorn.x86_const as X

    from .engine_state import EngineControl, STOP_ERROR

    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    engine = EngineControl(uc, engine_offsets)
    engine.stop_between_instructions()
    uc.mem_map(_PROBE_BASE, 0x1000)
    uc.mem_write(_PROBE_BASE, _PROBE_CODE)
    uc.reg_write(X.UC_X86_REG_RFLAGS, 0x2)
    requests = InterruptRequests(engine.cpu_address, engine_offsets.exit_request)
    probe = _ProbeCpu(_ProbeEngine(uc, engine))
    requests.request(hard=True, nmi=False)
    helper_patch.running.vcpu = probe
    error = None
    try:
        uc.emu_start(_PROBE_BASE, 0xFFFF_FFFF_FFFF_FFFF)
    except U.UcError as exc:
        error = exc.errno
    finally:
        helper_patch.running.vcpu = None
        left = requests.clear()
    seen = probe.engine.seen
    if seen != [_PROBE_BASE + 2] or not probe.window_exit or error != STOP_ERROR or left:
        log.info("software CPU: interrupt-window exits did not verify (stopped at %s, error %s, left %#x): "
                 "pending interrupts wait for short slices instead", seen, error, left)
        return False
    return True


def install(engine_offsets) -> bool:
    """Patch do_interrupt_x86_hardirq and verify the exits once per process; False when this
    libunicorn cannot do it (the scheduler then polls with short slices)."""
    global _available
    with _probe_lock:
        if _available is None:
            _available = helper_patch.install(HARDIRQ, _on_hardirq) and _probe(engine_offsets)
        return _available
