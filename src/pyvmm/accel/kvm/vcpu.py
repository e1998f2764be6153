"""KvmVcpu: one vCPU of the KVM accelerator and its run loop.

The loop enters the guest (KVM_RUN, through kvm.VcpuFd); single port-I/O and MMIO accesses
are served by the compiled loop of io_exits.py, every other exit is decoded here into the
neutral exits of accel/exits.py and handed to the shared ExitDispatcher. What only KVM
produces stays here: an instruction KVM failed to emulate is completed (assist.py) or
reported as an EmulationError naming it; a refused entry and KVM's system events become
neutral exits. Converts the backend-neutral CpuState to and from KVM's structs.
"""

from __future__ import annotations

import logging
import signal

from ...arch.x86_64.cpu_state import GPR_NAMES, SEGMENT_NAMES, CpuState, DescriptorTable, Segment, VcpuState
from ...kvm import KvmError, uapi
from ...kvm.exits import InternalError
from ...kvm.run import NATIVE_IO_EXITS, RUN_INTERRUPTED
from ...kvm.vcpu import EXIT_REASON_NAMES
from ..base import VcpuCounters, VmServices
from ..dispatch import ExitDispatcher
from ..exits import (
    HLT, INTERRUPTED, IRQ_WINDOW_OPEN, SHUTDOWN, DebugExit, EmulationError, IoIn, IoOut, MmioRead, MmioWrite,
    SystemEvent, UnknownExit, VcpuExit,
)
from . import assist as kvm_assist
from . import state as kvm_state
from .io_exits import EXIT_FIELDS, EXIT_IO, IO_FIELDS, IO_OUT, serve_io_exits

log = logging.getLogger(__name__)

# The signal that kicks a vCPU thread out of KVM_RUN (EINTR). Its handler does nothing.
KICK_SIGNAL = signal.SIGRTMIN + 1

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_DELIVERY_EXTINT = 0x700
APIC_DELIVERY_NMI = 0x400

_SYSTEM_EVENTS = {uapi.KVM_SYSTEM_EVENT_RESET: SystemEvent.RESET, uapi.KVM_SYSTEM_EVENT_SHUTDOWN: SystemEvent.POWEROFF}


# pyvmm's exit reason names (KVM_EXIT_*) where KVM's stats call the same exit otherwise
_KVM_STAT_NAMES = {"hlt": "halt"}


class KvmVcpu:
    """One vCPU of the KVM backend: state conversion, run, kick."""

    def __init__(self, accel, fd, index: int) -> None:
        self.accel, self.fd, self.index = accel, fd, index
        self.thread_ident: int | None = None
        self.assists: dict[str, int] = {}
        self.assist_refusal = ""  # why pyvmm could not complete the last instruction it knew
        self._symbols: object | None = None  # the guest kernel's, named in errors (from the VM, when it runs)
        # Taken out of the machine (CPU hotplug): KVM cannot destroy a vCPU, so its thread parks
        # (VmServices.unplugged_point) and its fd and state wait to be plugged in again.
        self.unplugged = False
        self._vm: VmServices | None = None

    # --- running ----------------------------------------------------------------------------

    def run_loop(self, vm: VmServices, dispatch: ExitDispatcher) -> None:
        """Enter the guest and serve its exits until the VM stops. The hot path, a single port
        I/O or MMIO access, is served by the compiled io_exits loop; everything else is decoded
        here into a neutral exit for the dispatcher, which serves it exactly as the hot path
        would. A stop or pause kicks the vCPU, which ends the hot loop."""
        self._symbols, self._vm = vm.symbols, vm
        fd, stopped = self.fd, vm.stop_requested
        run, page = fd.runner, fd.page
        pio, mmio = dispatch.pio_bus, dispatch.mmio_bus
        native = NATIVE_IO_EXITS    # the same loop in C (kvm/native_run.c) where it is built
        while not stopped.is_set():
            reason = run.serve_io_exits(page, pio, mmio) if native else serve_io_exits(run, page, pio, mmio)
            exit_ = self._string_io(page) if reason == EXIT_IO else self._other_exit(reason)
            if exit_ is not None:
                dispatch(self, exit_)

    @staticmethod
    def _string_io(page) -> VcpuExit:
        """A rep ins/outs exit: every item, for the dispatcher to serve one by one."""
        direction, size, port, count, offset = IO_FIELDS.unpack_from(page, EXIT_FIELDS)
        if direction == IO_OUT:
            return IoOut(port, size, count, page[offset:offset + size * count])
        return IoIn(port, size, count, page, offset)

    def _other_exit(self, reason: int) -> VcpuExit | None:
        """The neutral exit for anything but I/O; None when pyvmm completed an instruction KVM
        could not emulate (the guest simply goes on)."""
        if reason == RUN_INTERRUPTED or reason == uapi.KVM_EXIT_INTR:
            if self.unplugged and self._vm is not None:  # kicked for good (remove_vcpu): park
                self._vm.unplugged_point(lambda: self.unplugged)
            return INTERRUPTED
        if reason == uapi.KVM_EXIT_HLT:
            return HLT
        if reason == uapi.KVM_EXIT_IRQ_WINDOW_OPEN:
            return IRQ_WINDOW_OPEN
        if reason == uapi.KVM_EXIT_SHUTDOWN:
            return SHUTDOWN
        run = self.fd.run_struct
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            internal = run.exit.internal
            error = InternalError(internal.suberror, tuple(internal.data[: min(internal.ndata, 16)]))
            if self.assist(error):
                return None
            return EmulationError(self.describe_internal_error(error, self._symbols))
        if reason == uapi.KVM_EXIT_FAIL_ENTRY:
            return EmulationError(f"the host refused to enter the guest (hardware reason "
                                  f"{run.exit.fail_entry.hardware_entry_failure_reason:#x}) at {self.describe_position()}")
        if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            event = run.exit.system_event.type
            return SystemEvent(_SYSTEM_EVENTS.get(event, SystemEvent.CRASH), f"system event {event}")
        if reason == uapi.KVM_EXIT_DEBUG:
            return DebugExit(run.exit.debug.exception, run.exit.debug.pc)
        return UnknownExit(reason)

    def kick(self) -> None:
        """Make KVM_RUN return now, or immediately on its next entry (no lost wake-up)."""
        self.fd.immediate_exit = True
        ident = self.thread_ident
        if ident is not None:
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass  # the thread already ended

    def clear_kick(self) -> None:
        self.fd.immediate_exit = False

    @property
    def exit_counts(self) -> dict[str, int]:
        return {EXIT_REASON_NAMES.get(r, str(r)): n for r, n in enumerate(self.fd.exit_counts) if n}

    def counters(self) -> VcpuCounters:
        """From KVM's binary stats where the host has them: every exit, those KVM handles in the
        kernel too (its *_exits counters; the rest of its `exits` total is `other`). A KVM that
        leaves a counter behind (this host's counts no io_exits) is topped up with pyvmm's own
        count of the exits that reached it. Without binary stats: pyvmm's count alone."""
        own = {_KVM_STAT_NAMES.get(reason, reason): n for reason, n in self.exit_counts.items()}
        stats = self.fd.binary_stats()
        if stats is None:
            return VcpuCounters(own, "pyvmm", None)
        sample = stats.sample()
        exits = dict(own)
        for name, value in sample.items():
            if name.endswith("_exits") and isinstance(value, int) and value:
                reason = name[:-len("_exits")]
                exits[reason] = max(value, exits.get(reason, 0))
        total = sample.get("exits")
        if isinstance(total, int) and total > sum(exits.values()):
            exits["other"] = total - sum(exits.values())
        injected = [sample.get(name) for name in ("irq_injections", "nmi_injections")]
        return VcpuCounters(exits, "kvm-binary-stats", sum(v for v in injected if isinstance(v, int)))

    def set_msrs(self, values: dict[int, int]) -> None:
        supported = self.accel.supported_msrs()
        wanted = {i: v for i, v in values.items() if i in supported}
        done = self.fd.set_msrs(wanted)
        if done != len(wanted):
            refused = list(wanted)[done]
            log.warning("vCPU %d: KVM refused MSR %#x (and any after it)", self.index, refused)

    def set_virtual_wire_lints(self) -> None:
        """LINT0 = ExtINT, LINT1 = NMI on the BSP, so the 8259 reaches it before the guest programs its APIC."""
        # bytes(struct), not .regs: a c_char array field reads as a string, cut at its first NUL
        raw = bytearray(bytes(self.fd.get_lapic()))
        for offset, mode in ((APIC_LVT0, APIC_DELIVERY_EXTINT), (APIC_LVT1, APIC_DELIVERY_NMI)):
            value = int.from_bytes(raw[offset:offset + 4], "little")
            value = (value & ~0x10700 & 0xFFFFFFFF) | mode  # unmask, set the delivery mode
            raw[offset:offset + 4] = value.to_bytes(4, "little")
        self.fd.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(raw))

    # --- architectural state -------------------------------------------------------------

    def save(self) -> VcpuState:
        """The complete vCPU state (the vCPU must be out of the guest: paused or stopped)."""
        self.complete_pending_exit()
        return kvm_state.save_vcpu(self.accel, self.fd)

    def restore(self, state: VcpuState) -> None:
        """Load a saved state into this vCPU (a fresh one, created with the same CPUID)."""
        kvm_state.restore_vcpu(self.accel, self.fd, state)

    def complete_pending_exit(self) -> None:
        """Finish the instruction of the last I/O or MMIO exit without running guest code: KVM
        completes it only on the next KVM_RUN, and its registers are not consistent before
        (api.rst: re-enter with immediate_exit set)."""
        kicked = self.fd.immediate_exit
        self.fd.immediate_exit = True
        try:
            self.fd.run()  # returns at once, interrupted
        finally:
            self.fd.immediate_exit = kicked

    def set_state(self, state: CpuState) -> None:
        regs = self.fd.get_regs()
        for name in GPR_NAMES:
            setattr(regs, name, state.gprs.get(name, 0))
        regs.rip, regs.rflags = state.rip, state.rflags
        sregs = self.fd.get_sregs()
        for name, segment in state.segments.items():
            target = getattr(sregs, name)
            for field_name, value in vars(segment).items():
                setattr(target, field_name, value)
        sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
        sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
        sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4 = state.cr0, state.cr2, state.cr3, state.cr4
        sregs.cr8, sregs.efer = state.cr8, state.efer
        if state.apic_base is not None:
            sregs.apic_base = state.apic_base
        self.fd.set_sregs(sregs)
        self.fd.set_regs(regs)
        fpu = self.fd.get_fpu()
        fpu.fcw, fpu.mxcsr = state.fpu_control, state.mxcsr
        self.fd.set_fpu(fpu)
        if state.msrs:
            self.set_msrs(state.msrs)

    def get_state(self) -> CpuState:
        regs, sregs, fpu = self.fd.get_regs(), self.fd.get_sregs(), self.fd.get_fpu()
        state = CpuState(
            gprs={name: getattr(regs, name) for name in GPR_NAMES},
            rip=regs.rip,
            rflags=regs.rflags,
            gdt=DescriptorTable(sregs.gdt.base, sregs.gdt.limit),
            idt=DescriptorTable(sregs.idt.base, sregs.idt.limit),
            cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4, cr8=sregs.cr8,
            efer=sregs.efer, apic_base=sregs.apic_base,
            fpu_control=fpu.fcw, mxcsr=fpu.mxcsr,
        )
        for name in SEGMENT_NAMES:
            source = getattr(sregs, name)
            state.segments[name] = Segment(**{f: getattr(source, f) for f in Segment.__dataclass_fields__})
        return state

    def kvm_translate(self, linear: int) -> dict:
        """KVM's own translation of a linear address for this vCPU (KVM_TRANSLATE): the walk
        pyvmm's inspector cross-checks against. Out of the guest only (paused)."""
        translation = self.fd.translate(linear)
        return {"gpa": translation.physical_address if translation.valid else None, "valid": bool(translation.valid),
                "writeable": bool(translation.writeable), "usermode": bool(translation.usermode)}

    def describe_position(self, symbols=None, code: bytes | None = None) -> str:
        """Where the guest is, for error messages: CS:RIP (with the kernel symbol when `symbols`
        knows it), mode, CPL and the instruction bytes (`code`, else read at RIP)."""
        try:
            regs, sregs = self.fd.get_regs(), self.fd.get_sregs()
        except KvmError as exc:
            return f"(registers unavailable: {exc})"
        mode = "64-bit" if sregs.efer & (1 << 10) and sregs.cs.l else ("protected" if sregs.cr0 & 1 else "real")
        linear = sregs.cs.base + regs.rip if mode != "64-bit" else regs.rip
        text = f"rip={regs.rip:#x}"
        symbol = _symbolize(symbols, linear)
        if symbol:
            text += f" ({symbol})"
        text += f" cs={sregs.cs.selector:#x} ({mode} mode, CPL{sregs.cs.dpl})"
        code = self._code_bytes(linear, 8) if code is None else code
        if code:
            text += f" code: {code.hex(' ')}"
        return text

    def _code_bytes(self, linear: int, size: int = 15) -> bytes:
        """Up to `size` bytes at a linear address, through KVM_TRANSLATE page by page; fewer
        when a page is not mapped or not RAM."""
        memory = getattr(self.accel, "memory", None)
        if memory is None:
            return b""
        out = b""
        try:
            while len(out) < size:
                translation = self.fd.translate(linear)
                if not translation.valid:
                    break
                chunk = min(size - len(out), 0x1000 - (linear & 0xFFF))
                out += memory.read(translation.physical_address, chunk)
                linear += chunk
        except Exception:  # a diagnostic must never mask the error it describes
            pass
        return out

    def _failed_instruction(self, exit_: InternalError, regs, sregs) -> bytes:
        """The bytes KVM failed on: from the exit when KVM reports them, else read at CS:RIP."""
        code = exit_.instruction_bytes
        if len(code) < 15:
            long_code = sregs.efer & (1 << 10) and sregs.cs.l
            code = self._code_bytes(regs.rip if long_code else sregs.cs.base + regs.rip) or code
        return code

    def assist(self, exit_: InternalError) -> bool:
        """Complete an instruction KVM failed to emulate, when pyvmm knows how (assist.py)."""
        self.assist_refusal = ""
        if exit_.suberror != uapi.KVM_INTERNAL_ERROR_EMULATION:
            return False
        regs, sregs = self.fd.get_regs(), self.fd.get_sregs()
        code = self._failed_instruction(exit_, regs, sregs)
        try:
            found = kvm_assist.decode(code, kvm_assist.GuestView(regs, sregs, self.accel.memory))
        except kvm_assist.AssistError as exc:
            self.assist_refusal = str(exc)
            return False
        if found is None:
            return False
        kvm_assist.apply(self.fd, found)
        self.assists[found.name] = self.assists.get(found.name, 0) + 1
        if self.assists[found.name] == 1:
            log.info("vCPU %d: completing %s for KVM (it could not emulate it) at rip=%#x", self.index, found.name, regs.rip)
        return True

    def describe_internal_error(self, exit_: InternalError, symbols=None) -> str:
        """One line: what KVM could not run, where (with the kernel symbol when `symbols` has
        it), and what the user can do about it when pyvmm knows."""
        if exit_.suberror != uapi.KVM_INTERNAL_ERROR_EMULATION:
            return f"KVM internal error: {exit_.describe()} at {self.describe_position(symbols)}"
        try:
            regs, sregs = self.fd.get_regs(), self.fd.get_sregs()
            code_size = 64 if sregs.efer & (1 << 10) and sregs.cs.l else (32 if sregs.cs.db else 16)
            code = self._failed_instruction(exit_, regs, sregs)
        except KvmError:
            code, code_size = exit_.instruction_bytes, 64
        name, length = kvm_assist.name_instruction(code, code_size)
        shown = code[:length] if length else code[:8]
        text = f"KVM could not emulate {name} at {self.describe_position(symbols, shown)}"
        if self.assist_refusal:
            text += f"; pyvmm cannot complete it: {self.assist_refusal}"
        advice = kvm_assist.hint(name)
        if advice:
            text += f" (hint: {advice})"
        return text


def _symbolize(symbols, address: int) -> str:
    """'name+0xoff' for `address`, '' when there is no table or no symbol (never raises: this
    runs while reporting another error)."""
    if symbols is None:
        return ""
    try:
        return symbols.describe(address) or ""
    except Exception as exc:
        log.warning("cannot read the kernel symbols: %s", exc)
        return ""
