"""Translator: the one Unicorn instance on which all of a VM's software vCPUs run, in turn.

With one Unicorn instance per vCPU, each vCPU had its own translation cache, and code one
vCPU wrote (a kernel patching its own text, a freed page reused for new code) was dropped
from the writer's cache only: the other vCPUs went on running the old translation. One
instance has one cache, so the translator's own write tracking keeps every vCPU coherent,
as in single-threaded QEMU TCG, and code is translated once rather than once per vCPU.

Switching vCPUs saves the CPU state of the one that ran into its context, loads the next
one's and flushes the TLB, whose entries come from the other vCPU's page tables. Hooks and
MMIO callbacks go to the vCPU that is running (`current`).
"""

from __future__ import annotations

import ctypes
import weakref
from typing import TYPE_CHECKING

import unicorn as U
import unicorn.x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from ...arch.x86_64 import layout
from ..dispatch import ExitDispatcher
from .engine_state import EngineControl, EngineOffsets
from .fast_registers import FastRegisters
from .halt_flag import halt_flag
from .native_delivery import NativeExceptionDelivery
from . import code_aliases, code_buffer, direct_hooks, interrupt_window, msr_cr_policy, native_syscall
from .live_cpu_state import ApiSyscallMsrs, SyscallMsrs, live_context_base
from .native_interrupts import NativeInterrupts
from .private_state import ContextOffsets, PrivateState
from .slice_timer import SliceTimer
from .spin_loops import SpinLoops
from .translated_code import TranslatedCode

if TYPE_CHECKING:
    from .vcpu import TcgVcpu

MSR_EFER = 0xC0000080
# The bits of the control registers and EFER a page walk depends on (SDM vol. 3, 4.1.3): CR0
# PE, WP, PG; CR4 PSE, PAE, PGE, LA57, PCIDE, SMEP, SMAP, PKE; EFER LMA, NXE.
CR0_PAGING_BITS = (1 << 0) | (1 << 16) | (1 << 31)
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
CR4_PAGING_BITS = CR4_PSE | CR4_PAE | (1 << 7) | (1 << 12) | (1 << 17) | (1 << 20) | (1 << 21) | (1 << 22)
EFER_PAGING_BITS = (1 << 10) | (1 << 11)
_CTL_WRITE_TLB_FLUSH = (1 << 30) | U.unicorn_const.UC_CTL_TLB_FLUSH  # UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0)


class Translator:
    def __init__(self, memory, dispatch: ExitDispatcher, offsets: ContextOffsets, engine: EngineOffsets,
                 slice_timer: SliceTimer, native_exceptions: bool = True,
                 native_interrupts: bool = True, native_syscalls: bool = True) -> None:
        self.memory = memory
        self.dispatch = dispatch  # serves the vCPUs' port I/O and MMIO, as on KVM
        # 64-bit mode so the register API is 64 bits wide; it also presets EFER.LMA, which
        # vcpu_state._leave_paging() clears the architectural way before any state is loaded.
        uc = self.uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
        code_buffer.place(uc)  # before its first call allocates the code buffer, within reach of libunicorn
        # No `until` address: at the end of every emu_start Unicorn invalidates the code at
        # until - 1, translating it through the guest's page tables, which raises a silent #PF
        # and overwrites CR2 (-2 for until = 2**64-1). With exits mode on and no exits, slices
        # end only on HLT or a stop.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        # Slices are ended from the slice timer's thread: between instructions, without skipping
        # hooks (engine_state.py), which needs a setting made before anything is translated.
        self.engine = EngineControl(uc, engine)
        self.engine.stop_between_instructions()
        self.halt_flag = halt_flag(self.engine.cpu_address, engine)  # did a slice end on HLT?
        self.slice_timer = slice_timer  # ends the running slice; its owner closes it
        for region in memory.regions:
            uc.mem_map_ptr(region.guest_base, region.size, U.UC_PROT_ALL, region.host_address)
        hole = layout.MMIO_HOLE_END - layout.LOW_RAM_END
        # 64-bit PCI BARs live above RAM
        self.mmio64_base, size64 = layout.pci_mmio64_window(memory.size)
        # Port I/O and MMIO without the binding's wrappers where it allows (direct_hooks.py)
        self.direct_hooks = direct_hooks.install(uc)
        if self.direct_hooks is not None:
            self.direct_hooks.mmio(layout.LOW_RAM_END, hole, self)
            self.direct_hooks.mmio(self.mmio64_base, size64, self)
            self.direct_hooks.port_io(self)
        else:
            uc.mmio_map(layout.LOW_RAM_END, hole, self._mmio_read, None, self._mmio_write, None)
            uc.mmio_map(self.mmio64_base, size64, self._mmio64_read, None, self._mmio64_write, None)
            uc.hook_add(U.UC_HOOK_INSN, self._port_in, None, 1, 0, X.UC_X86_INS_IN)
            uc.hook_add(U.UC_HOOK_INSN, self._port_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(U.UC_HOOK_INSN, self._cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(U.UC_HOOK_INSN, self._syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        uc.hook_add(U.UC_HOOK_INSN, self._sysenter, None, 1, 0, X.UC_X86_INS_SYSENTER)
        # Exceptions: QEMU's own delivery inside the engine where possible (native_delivery.py)
        self.native_exceptions = NativeExceptionDelivery.install(uc, self.engine.cpu_address) \
            if native_exceptions else None
        if self.native_exceptions is None:
            uc.hook_add(U.UC_HOOK_INTR, self._exception)
        uc.hook_add(U.UC_HOOK_INSN_INVALID, self._invalid_opcode)
        # RDMSR, WRMSR and MOV to/from CRn where Unicorn's helpers are wrong (no hooks for them)
        self.helpers_patched = msr_cr_policy.install()
        # Code the guest rewrites through another mapping of its page runs as rewritten
        self.code_aliases_checked = code_aliases.install(engine.cpu)
        # Pending interrupts taken where the guest's window opens, not at the next slice end
        self.interrupt_requests = interrupt_window.InterruptRequests(self.engine.cpu_address, engine.exit_request) \
            if interrupt_window.install(engine) else None
        # External interrupts: QEMU's delivery too, as the next slice starts (native_interrupts.py)
        self.native_interrupts = NativeInterrupts.attach(self.engine.cpu_address, engine) \
            if self.native_exceptions is not None and native_interrupts else None
        if self.native_interrupts is not None:  # its slot in the stub's table is freed with the engine
            weakref.finalize(self, self.native_interrupts.close)
        self.private = PrivateState(uc, offsets, live_context_base(uc, self.engine.cpu_address))
        # SYSCALL from 64-bit code in machine code; the hook above takes every other case
        self.native_syscalls = native_syscall.attach(uc, offsets, self.private.live) if native_syscalls else None
        self.regs = FastRegisters(uc)
        self.syscall_msrs: SyscallMsrs | ApiSyscallMsrs = \
            SyscallMsrs.find(uc, self.private.live) or ApiSyscallMsrs(self.regs)  # what SYSCALL reads
        self.translated_code = TranslatedCode(uc, memory.regions)
        self.spin_loops = SpinLoops(uc, slice_timer.kick, self.translated_code)
        self._power_on = uc.context_save()  # the state a vCPU that never ran starts from
        self._contexts: dict[object, object] = {}
        self._paging: dict[object, tuple[int, int, int, int]] = {}  # each inactive vCPU's paging registers
        self.tlb_flushes = 0
        self.current: TcgVcpu | None = None

    def activate(self, vcpu: TcgVcpu) -> None:
        """Make `vcpu` the one whose state the engine holds."""
        if self.current is vcpu:
            return
        uc = self.uc
        if self.current is not None:
            saved = self._contexts.get(self.current)
            if saved is None:
                self._contexts[self.current] = uc.context_save()
            else:
                uc.context_update(saved)
        previous = self.current
        if previous is not None:
            self._paging[previous] = self._paging_registers()
        uc.context_restore(self._contexts.get(vcpu, self._power_on))
        # The TLB (and QEMU's jump cache, looked up by virtual address) holds what the previous
        # vCPU's page walks found; the context holds no TLB. Another vCPU with the same paging
        # registers would find the same in the same page tables: keep it. Any TLB may be
        # emptied at any time, so an INVLPG or CR3 load of one vCPU also emptying the other's
        # is allowed, and a vCPU changing its own paging registers flushes the TLB in QEMU.
        # (Flushing on every switch cost a 2-vCPU Linux boot about a fifth more CPU time.)
        if previous is None or self._paging.get(vcpu) != self._paging[previous]:
            uclib.uc_ctl(uc._uch, ctypes.c_int(_CTL_WRITE_TLB_FLUSH))  # the binding has no call for it
            self.tlb_flushes += 1
        self.current = vcpu

    def _paging_registers(self) -> tuple[int, int, int, int]:
        """What the running vCPU's page walks depend on besides guest memory: the bits of CR0,
        CR3, CR4 and EFER that take part in them (Linux leaves CR4.PSE set on the boot CPU only,
        and PSE means nothing with PAE)."""
        regs = self.regs
        cr4 = regs.read(X.UC_X86_REG_CR4) & CR4_PAGING_BITS
        if cr4 & CR4_PAE:
            cr4 &= ~CR4_PSE
        return (regs.read(X.UC_X86_REG_CR0) & CR0_PAGING_BITS, regs.read(X.UC_X86_REG_CR3), cr4,
                regs.read_msr(MSR_EFER) & EFER_PAGING_BITS)

    def forget(self, vcpu: TcgVcpu) -> None:
        """`vcpu` was unplugged: its saved context goes (the engine's state is nobody's now)."""
        self._contexts.pop(vcpu, None)
        self._paging.pop(vcpu, None)
        if self.current is vcpu:
            self.current = None

    def close(self) -> None:
        self.current = None
        self._contexts.clear()
        # drop the engine (and everything viewing it) now: nothing uses a closed translator
        self.uc = self.private = self.regs = self.engine = self.translated_code = None  # type: ignore[assignment]
        self.halt_flag = None
        self.spin_loops = None  # type: ignore[assignment]
        self.syscall_msrs = None  # type: ignore[assignment]
        self.native_exceptions = None
        self.interrupt_requests = None
        if self.native_interrupts is not None:
            self.native_interrupts.close()
            self.native_interrupts = None
        if self.native_syscalls is not None:
            self.native_syscalls.close()
            self.native_syscalls = None

    # --- hooks: to the running vCPU -----------------------------------------------------------

    # (the engine runs only with a vCPU activated: `current` is set while a hook can fire)

    # (through the binding, where direct_hooks.py cannot be used)

    def _port_in(self, uc, port, size, _):
        vcpu = self.current
        assert vcpu is not None
        return vcpu.port_in(port, size)

    def _port_out(self, uc, port, size, value, _):
        vcpu = self.current
        assert vcpu is not None
        vcpu.port_out(port, size, value)

    def _mmio_read(self, uc, offset, size, _):
        vcpu = self.current
        assert vcpu is not None
        return vcpu.mmio_read(layout.LOW_RAM_END + offset, size)

    def _mmio_write(self, uc, offset, size, value, _):
        vcpu = self.current
        assert vcpu is not None
        vcpu.mmio_write(layout.LOW_RAM_END + offset, size, value)

    def _mmio64_read(self, uc, offset, size, _):
        vcpu = self.current
        assert vcpu is not None
        return vcpu.mmio_read(self.mmio64_base + offset, size)

    def _mmio64_write(self, uc, offset, size, value, _):
        vcpu = self.current
        assert vcpu is not None
        vcpu.mmio_write(self.mmio64_base + offset, size, value)

    def _cpuid(self, uc, _):
        vcpu = self.current
        assert vcpu is not None
        return vcpu.cpuid()

    def _syscall(self, uc, _):
        vcpu = self.current
        assert vcpu is not None
        vcpu.syscall()

    def _sysenter(self, uc, _):
        vcpu = self.current
        assert vcpu is not None
        vcpu.sysenter()

    def _exception(self, uc, vector, _):
        vcpu = self.current
        assert vcpu is not None
        vcpu.exception(vector)

    def _invalid_opcode(self, uc, _):
        vcpu = self.current
        assert vcpu is not None
        return vcpu.invalid_opcode()
