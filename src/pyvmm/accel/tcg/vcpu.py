"""TcgVcpu: one x86-64 vCPU translated by Unicorn, on pyvmm's guest RAM and buses.

Unicorn executes guest code; pyvmm supplies what it leaves out (see
SOFTWARE_CPU.md): delivery of exceptions and interrupts through the IDT,
SYSCALL, CPUID from pyvmm's policy, HLT detection, and I/O to the shared buses.
`run(seconds)` executes guest code for up to `seconds` (less if it halts, or if the
slice timer is kicked) and returns a typed exit, the same types the KVM backend produces.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from typing import Callable

import unicorn as U
import unicorn.x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from ...arch.x86_64.cpu_state import CR0_PE, EFER_LMA, CpuState, VcpuState
from ...arch.x86_64.paging import PagingMode, read_linear, write_linear
from ..base import VcpuCounters
from ..exits import HLT, INTERRUPTED, SHUTDOWN, EmulationError, VcpuExit
from .delivery import DOUBLE_FAULT, ERROR_CODE_VECTORS, TripleFault, deliver
from .engine_state import STOP_ERROR
from . import guest_io, helper_patch
from .private_state import HF_CS64_MASK, HF_LMA_MASK
from .stack_writes import release_stack_pages
from .string_assist import finish_rep_stos
from .translator import Translator
from . import vcpu_state

log = logging.getLogger(__name__)

_SEGMENT_REGS = {"cs": X.UC_X86_REG_CS, "ds": X.UC_X86_REG_DS, "es": X.UC_X86_REG_ES,
                 "fs": X.UC_X86_REG_FS, "gs": X.UC_X86_REG_GS, "ss": X.UC_X86_REG_SS}
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
EFER_SCE = 1 << 0
RFLAGS_IF, RFLAGS_RF, RFLAGS_VM = 1 << 9, 1 << 16, 1 << 17
GENERAL_PROTECTION_VECTOR = 13
INVALID_OPCODE = 6
NMI_VECTOR = 2
CR4_OSXSAVE, CR4_PKE = 1 << 18, 1 << 22
CPUID1_ECX_OSXSAVE, CPUID7_ECX_OSPKE = 1 << 27, 1 << 4
uc_emu_start = uclib.uc_emu_start
_NEVER = 0xFFFF_FFFF_FFFF_FFFF  # address mask; also the ignored `until` argument (exits mode)
HLT_OPCODE = 0xF4
PAUSE = b"\xf3\x90"
SPIN_LOOP_REACH = 16  # bytes on either side of RIP searched for a PAUSE
UNTAKEN_REPORTS = (1000, 10000, 100000)  # slices an injected interrupt waited, each said once
_INTERRUPTED, _HLT, _SHUTDOWN = INTERRUPTED, HLT, SHUTDOWN


def _in_64bit_code(hflags: int) -> bool:
    return hflags & (HF_LMA_MASK | HF_CS64_MASK) == HF_LMA_MASK | HF_CS64_MASK


class TcgVcpu:
    def __init__(self, index: int, translator: Translator, cpuid_table, lapic=None) -> None:
        self.index = index
        self.translator = translator
        self.memory = translator.memory
        self.dispatch = translator.dispatch
        self.pio_bus, self.mmio_bus = translator.dispatch.pio_bus, translator.dispatch.mmio_bus
        self.non_executable_stack_pages: set[tuple[int, int]] = set()  # (CR3, page): stack_writes.py
        self.lapic = lapic
        self.cpuid_table = cpuid_table
        # the engine and its views, shared by every vCPU: valid while this vCPU is active
        self.uc, self.private, self.regs = translator.uc, translator.private, translator.regs
        self.engine, self.slice_timer = translator.engine, translator.slice_timer
        self._exit: VcpuExit | None = None
        self._pinned_paging: PagingMode | None = None
        self._in_exception = False
        self._injected: int | None = None  # an interrupt the engine delivers as the next slice starts
        self._untaken_slices = 0  # slices in a row that ended with self._injected not taken
        self._slice_expired = False  # the last slice ran to its deadline, maybe inside a REP STOS
        self.halted = False
        self.spinning = False  # the last slice ended in a spin loop (the scheduler's hint)
        self.waiting_for_sipi = index != 0
        # set by the scheduler for the next slice: stop where an external interrupt / a blocked
        # NMI can be taken (interrupt_window.py); cleared when the slice ends
        self.want_interrupt_window = self.want_nmi_window = self.window_exit = False
        self._take_at_window = False  # the request this slice made for its own I/O: take_at_window
        self.frozen_tsc: int | None = None  # the guest TSC while the VM is paused (vcpu_state.freeze_tsc)
        self.thread_ident: int | None = None
        # what kick() does: end the running slice; the accelerator also wakes its scheduler
        self.wake: Callable[[], None] = self.slice_timer.kick
        self.stats = {"slices": 0, "exceptions": 0, "interrupts": 0, "syscalls": 0, "halts": 0,
                      "port_io": 0, "mmio": 0, "cpuid": 0, "string_assists": 0,
                      "kicks_served": 0, "slices_ended_by_kicks": 0}

    # --- running -------------------------------------------------------------------------

    def run(self, seconds: float = 0.004):
        """Execute guest code for up to `seconds`; returns Interrupted (the slice ended: its time
        was up, or the slice timer was kicked), Hlt or an ending exit."""
        self.translator.activate(self)
        if self._exit is _SHUTDOWN:  # an interrupt injected between slices could not be delivered
            self._exit = None
            return _SHUTDOWN
        self._exit = None
        self.stats["slices"] += 1
        uc = self.uc
        # Between two instructions no exception is in flight, but Unicorn can carry its
        # double-fault tracking across a slice boundary (also for a fault whose hook never ran):
        # the next fault would then become a #DF, or a silent triple fault that halts the CPU.
        hflags = self.private.finish_exception()
        if self._slice_expired and finish_rep_stos(self):  # (not after a kick: one per device interrupt)
            self.stats["string_assists"] += 1
        release_stack_pages(self, in_64bit_code=_in_64bit_code(hflags))
        rip = self.regs.read(X.UC_X86_REG_RIP)
        native = self.translator.native_exceptions
        delivered = native.delivered if native is not None else 0
        native_syscalls = self.translator.native_syscalls
        syscalls = native_syscalls.count if native_syscalls is not None else 0
        timer = self.slice_timer
        requests = self.translator.interrupt_requests
        if requests is not None and (self.want_interrupt_window or self.want_nmi_window):
            requests.request(hard=self.want_interrupt_window, nmi=self.want_nmi_window)
        interrupts, injected = self.translator.native_interrupts, self._injected
        if injected is not None and interrupts is not None:  # (a window request outlives its delivery)
            interrupts.arm(injected, keep_request=self.want_interrupt_window)
        self.want_interrupt_window = self.want_nmi_window = self.window_exit = False
        timer.begin(self.engine.request_stop, seconds)
        error: int | None = None  # uc_emu_start's status when not UC_ERR_OK
        requested = None
        running = helper_patch.running
        running.vcpu = self  # the patched helpers (msr_cr_policy.py) act for this vCPU
        # uc_emu_start itself, not the binding's emu_start: that raised a UcError for every slice
        # the timer ended (STOP_ERROR), an exception object and its traceback per slice.
        uc._hook_exception = None  # a hook's exception, kept by the hooks' wrappers for after the slice
        try:
            status = uc_emu_start(uc._uch, rip, _NEVER, 0, 0)
            if status != U.UC_ERR_OK:
                error = status
            elif uc._hook_exception is not None:
                raise uc._hook_exception
        finally:
            running.vcpu = None
            stopped = timer.end()
            self._slice_expired = timer.expired
            if injected is not None and interrupts is not None:
                requested = interrupts.requested() if self._untaken_slices + 1 in UNTAKEN_REPORTS else None
                self._injected = interrupts.disarm()  # (the engine did not take it)
            if requests is not None:  # (also made within the slice: accelerator._wake)
                requests.clear()  # the CPUState is every vCPU's: no request outlives the slice
                self._take_at_window = False
        stopped = stopped or self.window_exit
        if injected is None or self._injected is None:
            self._untaken_slices = 0
        else:
            self._untaken_slices += 1
            if self._untaken_slices in UNTAKEN_REPORTS:
                self._report_untaken(requested)
        if self._injected is not None and self.rflags & RFLAGS_IF and not self.private.interrupts_inhibited():
            self._deliver_pending_injection()  # (an emu_start can end before its loop checks requests)
        if native_syscalls is not None:
            self.stats["syscalls"] += native_syscalls.count - syscalls
        if native is not None:
            self.stats["exceptions"] += native.delivered - delivered
            # Only a triple fault leaves QEMU's #DF tracking set (native_delivery.py), and it ends
            # the slice itself. (Were the timer to end the slice too, the fault recurs.)
            if not stopped and self.private.read()[2] == DOUBLE_FAULT:
                log.debug("vCPU %d: triple fault at %s", self.index, self.describe_position())
                return _SHUTDOWN
        if self._exit is not None:
            return self._exit
        if error is not None and error != STOP_ERROR:
            return EmulationError(f"the software CPU stopped at {self.describe_position()}: {U.UcError(error)}")
        # Unicorn returns from emu_start after HLT without saying so: a slice that nobody
        # stopped ended on a HLT. (One that was stopped may have just executed a HLT too: it
        # counts as interrupted, and the guest sees a wakeup, as after an interrupt.)
        if not stopped and self._injected is None and self._after_hlt():
            self.halted = True
            self.stats["halts"] += 1
            return _HLT
        return _INTERRUPTED

    def _report_untaken(self, requested: bool | None) -> None:
        """An injected interrupt the engine has not taken for many slices in a row: a guest
        waiting with IF=0 that long is stuck, or the engine's request was lost. Say which."""
        try:
            hflags, rflags = self.private.hflags(), self.rflags
            log.warning("vCPU %d: interrupt %s injected %d slices ago and not taken: rflags=%#x (IF=%d) "
                        "shadow=%d request=%s at %s", self.index, self._injected, self._untaken_slices, rflags,
                        rflags >> 9 & 1, bool(self.private.interrupts_inhibited()), requested,
                        self.describe_position() + f" hflags={hflags:#x}")
        except Exception as exc:  # a diagnostic must never stop the vCPU
            log.warning("vCPU %d: interrupt %s not taken for %d slices (%s)", self.index, self._injected,
                        self._untaken_slices, exc)

    def at_pause(self) -> bool:
        """Stopped near a PAUSE (within a short loop's length): most likely in a spin loop,
        waiting for another vCPU. Only a scheduling hint: a wrong answer costs a short turn."""
        try:
            around = self.read_linear(self.linear_rip - SPIN_LOOP_REACH, 2 * SPIN_LOOP_REACH)
        except Exception:
            return False
        return PAUSE in around

    def _after_hlt(self) -> bool:
        halted = self.translator.halt_flag
        if halted is not None:
            return bool(halted.value)  # (halt_flag.py)
        try:
            return self.read_linear(self.linear_rip - 1, 1)[0] == HLT_OPCODE
        except Exception:
            return False

    def kick(self) -> None:
        """End the running slice (the accelerator also wakes its sleeping scheduler)."""
        self.wake()

    def clear_kick(self) -> None:
        pass

    @property
    def exit_counts(self) -> dict[str, int]:
        return {name: n for name, n in self.stats.items() if n}

    def counters(self) -> VcpuCounters:
        """The translator loop's own counts: why each slice of guest code ended, and the
        external interrupts the scheduler injected."""
        return VcpuCounters(self.exit_counts, "software-cpu", self.stats["interrupts"])

    # --- hooks ---------------------------------------------------------------------------------

    # The engine's hooks call guest_io's functions for the running vCPU directly (compiled, no
    # Python frame); these are the same for the Unicorn binding's hooks and for tests.
    def port_in(self, port: int, size: int) -> int:
        return guest_io.port_in(self, port, size)

    def port_out(self, port: int, size: int, value: int) -> None:
        guest_io.port_out(self, port, size, value)

    def mmio_read(self, address: int, size: int) -> int:
        return guest_io.mmio_read(self, address, size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        guest_io.mmio_write(self, address, size, value)

    def cpuid(self) -> int:
        self.stats["cpuid"] += 1
        leaf = self.regs.read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
        subleaf = self.regs.read(X.UC_X86_REG_ECX) & 0xFFFFFFFF
        eax, ebx, ecx, edx = self.cpuid_table.lookup(leaf, subleaf)
        if leaf in (1, 7):  # bits that mirror CR4 (SDM vol. 2, CPUID: OSXSAVE, OSPKE)
            cr4 = self.regs.read(X.UC_X86_REG_CR4)
            if leaf == 1:
                ecx = ecx & ~CPUID1_ECX_OSXSAVE | (CPUID1_ECX_OSXSAVE if cr4 & CR4_OSXSAVE else 0)
            elif subleaf == 0:
                ecx = ecx & ~CPUID7_ECX_OSPKE | (CPUID7_ECX_OSPKE if cr4 & CR4_PKE else 0)
        self.regs.write(X.UC_X86_REG_RAX, eax)
        self.regs.write(X.UC_X86_REG_RBX, ebx)
        self.regs.write(X.UC_X86_REG_RCX, ecx)
        self.regs.write(X.UC_X86_REG_RDX, edx)
        return 1  # handled: skip Unicorn's own CPUID

    def syscall(self) -> None:
        """SYSCALL as the SDM defines it (Unicorn's is a stub that only advances RIP by 2)."""
        self.stats["syscalls"] += 1
        rip = self.regs.read(X.UC_X86_REG_RIP)  # at the SYSCALL instruction
        efer, star, lstar, fmask = self.translator.syscall_msrs.read()
        if not efer & EFER_SCE or not efer & EFER_LMA:
            self._raise(INVALID_OPCODE)
            self._set_rip(self.regs.read(X.UC_X86_REG_RIP) - 2)
            return
        rflags = self.regs.read(X.UC_X86_REG_RFLAGS)
        self.regs.write(X.UC_X86_REG_RCX, rip + 2)
        self.regs.write(X.UC_X86_REG_R11, rflags)
        kernel_cs = star >> 32 & 0xFFFC
        self.regs.write(X.UC_X86_REG_CS, kernel_cs)
        self.regs.write(X.UC_X86_REG_SS, kernel_cs + 8)
        self.private.enter_syscall_target(kernel_cs)   # after the register API: it writes selectors only
        self.regs.write(X.UC_X86_REG_RFLAGS, rflags & ~fmask & ~RFLAGS_RF)
        self._set_rip((lstar - 2) & _NEVER)  # Unicorn adds 2 after this hook

    def sysenter(self) -> None:
        """SYSENTER as the SDM defines it (Unicorn's is a stub that only advances EIP by 2)."""
        self.stats["syscalls"] += 1
        kernel_cs = self.regs.read_msr(MSR_SYSENTER_CS) & 0xFFFC
        if not self.protected_mode or not kernel_cs:
            self._raise(GENERAL_PROTECTION_VECTOR, 0)
            self._set_rip(self.regs.read(X.UC_X86_REG_RIP) - 2)
            return
        long_mode = self.long_mode
        mask = _NEVER if long_mode else 0xFFFFFFFF
        rflags = self.regs.read(X.UC_X86_REG_RFLAGS)
        self.regs.write(X.UC_X86_REG_CS, kernel_cs)
        self.regs.write(X.UC_X86_REG_SS, kernel_cs + 8)
        self.private.enter_syscall_target(kernel_cs, long_code=long_mode)
        self.regs.write(X.UC_X86_REG_RFLAGS, rflags & ~(RFLAGS_VM | RFLAGS_IF | RFLAGS_RF))
        self.regs.write(X.UC_X86_REG_RSP, self.regs.read_msr(MSR_SYSENTER_ESP) & mask)
        self._set_rip((self.regs.read_msr(MSR_SYSENTER_EIP) - 2) & mask)  # Unicorn adds 2 after this hook

    def exception(self, vector: int) -> None:
        with self._paging_pinned():
            length = self._software_interrupt_length(vector)
            error = None
            if vector in ERROR_CODE_VECTORS and not length:
                error = self.private.error_code()
            self._raise(vector, error, length)

    def invalid_opcode(self) -> bool:
        with self._paging_pinned():
            self._raise(INVALID_OPCODE)
        return True  # handled: continue at the handler (or stop, after a triple fault)

    def _raise(self, vector: int, error: int | None = None, length: int = 0) -> None:
        """Deliver an exception; `length`: of the INT n / INT3 / INTO that raised it (0: a fault)."""
        self.stats["exceptions"] += 1
        self._in_exception = True
        try:
            deliver(self, vector, error_code=error, software=bool(length), length=length)
        except TripleFault as exc:
            log.debug("vCPU %d: triple fault: %s", self.index, exc)
            self._exit = _SHUTDOWN
            self.uc.emu_stop()
        finally:
            self._in_exception = False

    def _software_interrupt_length(self, vector: int) -> int:
        """INT n / INT3 / INTO leave RIP after the instruction (its length is returned); faults
        leave it on the instruction (0)."""
        try:
            before = self.read_linear(self.linear_rip - 2, 2)
        except Exception:
            return 0
        if (vector == 3 and before[1] == 0xCC) or (vector == 4 and before[1] == 0xCE):
            return 1
        return 2 if before[0] == 0xCD and before[1] == vector else 0

    def rewind_rip(self, length: int) -> None:
        """Back to the INT instruction whose delivery faulted (delivery.py)."""
        self._set_rip((self.rip - length) & (_NEVER if self.long_mode else 0xFFFFFFFF))

    def inject_interrupt(self, vector: int, *, now: bool = False) -> None:
        """Deliver an external interrupt (the scheduler checked IF and the STI shadow): by the engine
        as the next slice starts (native_interrupts.py), else (or `now`: an NMI) at once, in Python."""
        self.translator.activate(self)
        self.stats["interrupts"] += 1
        self.halted = False
        if not now and self.translator.native_interrupts is not None and self._injected is None:
            self._injected = vector
            return
        self._deliver_pending_injection()
        self._deliver_interrupt_now(vector)

    def _deliver_pending_injection(self) -> None:  # (before the state is read between slices)
        vector, self._injected = self._injected, None
        if vector is not None:
            self._deliver_interrupt_now(vector)

    def _deliver_interrupt_now(self, vector: int) -> None:
        try:
            with self._paging_pinned():
                deliver(self, vector)
        except TripleFault as exc:
            log.debug("vCPU %d: triple fault delivering interrupt %d: %s", self.index, vector, exc)
            self._exit = _SHUTDOWN

    def wait_for_window(self) -> bool:
        """Called on this vCPU's thread while it runs (an interrupt raised by its own I/O, often
        inside the guest's port lock with IF=0): True when an interrupt-window request covers
        the pending interrupt, so the slice need not end now only to wait for the window: the
        engine stops where the window opens and the scheduler injects it (interrupt_window.py).
        Per console byte this ends one slice instead of two (event_costs.py)."""
        requests, lapic, interrupts = self.translator.interrupt_requests, self.lapic, self.translator.native_interrupts
        if requests is None or lapic is None or lapic.nmi_pending or lapic.pending_vector() is None:
            return False
        if self._injected is not None and (interrupts is None or interrupts.armed()):
            return False  # a vector armed and not yet taken: its delivery would consume the request
        requests.request(hard=True, nmi=False)
        self._take_at_window = True
        return True

    def take_at_window(self) -> int | None:
        """Inside the engine, where the window a wait_for_window() request asked for opened (IF
        set, no shadow): the vector for the engine to deliver there and then, or None to end the
        slice and leave it to the scheduler (an NMI came, or the interrupt went away)."""
        lapic = self.lapic
        if not self._take_at_window or lapic is None or lapic.nmi_pending:
            return None
        vector, another = lapic.acknowledge_if_pending()
        if vector is None:
            return None
        self.stats["interrupts"] += 1
        if another and self.translator.interrupt_requests is not None:
            self.translator.interrupt_requests.request(hard=True, nmi=False)  # the next one, at the next window
        else:
            self._take_at_window = False
        return vector

    def nmi_window_open(self) -> bool:
        """No NMI in service (none delivered since the last IRET) and no MOV SS / STI shadow."""
        self.translator.activate(self)
        return not self.private.nmi_blocked() and not self.private.interrupts_inhibited()

    def nmi_blocked_until_iret(self) -> bool:
        """An NMI is in service (blocking the next until IRET), outside any STI / MOV SS shadow."""
        self.translator.activate(self)
        return self.private.nmi_blocked() and not self.private.interrupts_inhibited()

    def inject_nmi(self) -> None:
        """Deliver an NMI (vector 2, whatever IF says); NMIs stay blocked until the next IRET."""
        self.inject_interrupt(NMI_VECTOR, now=True)
        if self._exit is not _SHUTDOWN:
            self.private.block_nmi()

    def interrupt_window_open(self) -> bool:
        """IF set, no STI / MOV SS shadow, and no interrupt injected that the guest has yet to take."""
        self.translator.activate(self)
        return self._injected is None and bool(self.rflags & (1 << 9)) and not self.private.interrupts_inhibited()

    # --- the adapter delivery.py uses -----------------------------------------------------------

    @property
    def long_mode(self) -> bool:
        return bool(self.regs.read_msr(MSR_EFER) & EFER_LMA)

    @property
    def protected_mode(self) -> bool:
        return bool(self.regs.read(X.UC_X86_REG_CR0) & CR0_PE)

    @property
    def cpl(self) -> int:
        if not self.protected_mode:
            return 0
        return self.private.hflags() & 3

    @property
    def idt(self) -> tuple[int, int]:
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        return base, limit

    @property
    def gdt(self) -> tuple[int, int]:
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_GDTR)
        return base, limit

    @property
    def cs(self) -> int:
        return self.regs.read(X.UC_X86_REG_CS)

    @property
    def ss(self) -> int:
        return self.regs.read(X.UC_X86_REG_SS)

    @property
    def rsp(self) -> int:
        return self.regs.read(X.UC_X86_REG_RSP)

    @property
    def rip(self) -> int:
        return self.regs.read(X.UC_X86_REG_RIP)

    @property
    def rflags(self) -> int:
        return self.regs.read(X.UC_X86_REG_RFLAGS)

    @property
    def linear_rip(self) -> int:
        rip = self.rip
        if self.long_mode:
            return rip
        return (self.segment_base("cs") + rip) & 0xFFFFFFFF

    def load_cs(self, selector: int) -> None:
        """Load CS and make the translator agree with the descriptor's code size (L/D bits)."""
        self.regs.write(X.UC_X86_REG_CS, selector)
        descriptor = self._descriptor(selector)
        if descriptor is not None:
            self.private.set_code_size(long_code=bool(descriptor >> 53 & 1), default_32=bool(descriptor >> 54 & 1))

    def _descriptor(self, selector: int) -> int | None:
        base, limit = self.gdt
        index = selector & ~7
        if not self.protected_mode or selector & 4 or not index or index + 7 > limit:
            return None
        return struct.unpack("<Q", self.read_linear(base + index, 8))[0]

    def segment_base(self, name: str) -> int:
        if not self.protected_mode:
            return self.regs.read(_SEGMENT_REGS[name]) << 4
        d = self._descriptor(self.regs.read(_SEGMENT_REGS[name]))
        return 0 if d is None else (d >> 16 & 0xFFFFFF) | (d >> 56 & 0xFF) << 24

    @property
    def paging(self) -> PagingMode:
        if self._pinned_paging is not None:
            return self._pinned_paging
        return PagingMode(self.regs.read(X.UC_X86_REG_CR0), self.regs.read(X.UC_X86_REG_CR3),
                          self.regs.read(X.UC_X86_REG_CR4), self.regs.read_msr(MSR_EFER))

    @contextlib.contextmanager
    def _paging_pinned(self):
        """Read the paging registers once for a whole event delivery (several page walks),
        which changes none of them."""
        self._pinned_paging = self.paging
        try:
            yield
        finally:
            self._pinned_paging = None

    def read_linear(self, linear: int, size: int) -> bytes:
        return read_linear(self.memory, self.paging, linear, size)

    def write_linear(self, linear: int, data: bytes) -> None:
        write_linear(self.memory, self.paging, linear, data)

    def set_cr2(self, value: int) -> None:
        self.regs.write(X.UC_X86_REG_CR2, value)

    def tss_read_u64(self, offset: int) -> int:
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_TR)
        return struct.unpack("<Q", self.read_linear(base + offset, 8))[0]

    def enter_handler(self, *, selector: int, rip: int, rsp: int, rflags: int, new_cpl: int,
                      new_ss: int | None) -> None:
        """Enter a handler at `new_cpl`; `new_ss`: the SS selector a privilege change loads (a
        NULL selector with RPL = CPL in 64-bit mode, TSS.SS0 in legacy protected mode)."""
        if self._in_exception or new_cpl != self.cpl:
            # forget the exception (Unicorn's #DF tracking) and drop to the handler's privilege
            self.private.finish_exception(new_cpl=new_cpl if new_cpl != self.cpl else None)
        self.load_cs(selector)
        if new_ss is not None:
            self.regs.write(X.UC_X86_REG_SS, new_ss)
        self.regs.write(X.UC_X86_REG_RSP, rsp)
        self.regs.write(X.UC_X86_REG_RFLAGS, rflags)
        self._set_rip(rip)

    def in_64bit_code(self) -> bool:
        return _in_64bit_code(self.private.hflags())

    def drop_translations(self, start: int, end: int) -> None:
        """Guest-physical [start, end) was written behind the translator's back (between slices)."""
        self.translator.translated_code.drop(start, end)

    def set_rip_between_slices(self, rip: int) -> None:
        self.regs.write(X.UC_X86_REG_RIP, rip)

    def _set_rip(self, rip: int) -> None:
        """RIP from a hook (exception, SYSCALL) or between slices. A write from a hook leaves Unicorn
        resuming at a stale PC after later stops of the slice unless it is told to forget it."""
        self.regs.write(X.UC_X86_REG_RIP, rip)
        self.engine.forget_pc_write()

    # --- architectural state ---------------------------------------------------------------------

    def save(self) -> VcpuState:
        """The complete vCPU state, in the format KVM's vCPUs save (between slices only)."""
        self.translator.activate(self)
        self._deliver_pending_injection()
        return vcpu_state.save(self)

    def restore(self, state: VcpuState) -> None:
        """Load a saved state (refused with one StateError line, before any change, where the
        software CPU cannot hold it: see vcpu_state.py)."""
        self.translator.activate(self)
        vcpu_state.restore(self, state)
        self._injected = None

    def set_state(self, state: CpuState) -> None:
        self.translator.activate(self)
        self._injected = None
        vcpu_state.load_cpu_state(self, state)
        self.waiting_for_sipi = self.halted = False

    def get_state(self) -> CpuState:
        self.translator.activate(self)
        self._deliver_pending_injection()
        return vcpu_state.cpu_state(self)

    def start_at_sipi(self, vector: int) -> None:
        """Real-mode start at vector:0000, as an AP does on a startup IPI."""
        self.translator.activate(self)
        self._injected = None
        vcpu_state.load_startup_state(self, vector)
        self.waiting_for_sipi = self.halted = False

    def describe_position(self) -> str:
        self.translator.activate(self)
        try:
            mode = "64-bit" if self.long_mode else ("protected" if self.protected_mode else "real")
            text = f"rip={self.rip:#x} cs={self.cs:#x} ({mode} mode, CPL{self.cpl})"
            try:
                text += f" code: {self.read_linear(self.linear_rip, 8).hex(' ')}"
            except Exception:
                pass
            return text
        except Exception as exc:  # a diagnostic must never mask the error it describes
            return f"(registers unavailable: {exc})"

    def close(self) -> None:
        # drop this vCPU's views of the engine: nothing runs a closed vCPU
        self.uc = self.private = self.regs = self.engine = None  # type: ignore[assignment]
