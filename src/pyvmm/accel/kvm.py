"""The KVM accelerator: guest code runs on the host CPU through /dev/kvm.

Owns the VM fd and the vCPU fds; uses KVM's in-kernel irqchip (PIC, IOAPIC,
LAPICs) and PIT, so timers and interrupt routing cost no Python. Converts the
backend-neutral CpuState to and from KVM's structs.
"""

from __future__ import annotations

import logging
import signal
import threading

from ..arch.x86_64 import layout, msrs
from ..arch.x86_64.cpu_state import GPR_NAMES, SEGMENT_NAMES, CpuState, DescriptorTable, Segment
from ..arch.x86_64.cpuid import EMULATED_KERNEL_HIDDEN, CpuidPolicy, kvm_guest_cpuid
from ..kvm import Kvm, KvmError, KvmUnavailable, uapi
from ..kvm.exits import InternalError
from . import kvm_assist
from .kvm_interrupts import KvmIoEventFds, KvmMsiRouter, KvmMsiVector
from ..kvm.vcpu import EXIT_REASON_NAMES

log = logging.getLogger(__name__)

# The signal that kicks a vCPU thread out of KVM_RUN (EINTR). Its handler does nothing.
KICK_SIGNAL = signal.SIGRTMIN + 1
_kick_handler_installed = False

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_DELIVERY_EXTINT = 0x700
APIC_DELIVERY_NMI = 0x400

REQUIRED_CAPABILITIES = {
    uapi.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    uapi.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
    uapi.KVM_CAP_PIT2: "KVM_CAP_PIT2",
    uapi.KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    uapi.KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID",
    uapi.KVM_CAP_MP_STATE: "KVM_CAP_MP_STATE",
    uapi.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
}


def install_kick_handler() -> None:
    """Install the no-op handler for KICK_SIGNAL; Python only allows this from the main thread."""
    global _kick_handler_installed
    if _kick_handler_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("pyvmm must create its first VM from the main thread (it installs a signal handler)")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    _kick_handler_installed = True


class KvmIrqLine:
    """An input pin of the in-kernel irqchip (GSI), driven with KVM_IRQ_LINE."""

    def __init__(self, vm_fd, gsi: int) -> None:
        self._vm_fd, self.gsi = vm_fd, gsi

    def set_level(self, high: bool) -> None:
        self._vm_fd.irq_line(self.gsi, 1 if high else 0)

    def trigger(self) -> None:
        self._vm_fd.irq_line(self.gsi, 1)
        self._vm_fd.irq_line(self.gsi, 0)


class KvmAccelerator:
    name = "kvm"
    per_vcpu_threads = True  # each vCPU thread sits in KVM_RUN; Vm runs the exit loop

    def __init__(self, kvm: Kvm | None = None, *, kernel_code_emulated: bool = False) -> None:
        """`kernel_code_emulated`: this host's KVM emulates guest kernel code (the calibration
        of accel.select says so); the guest then does not see the CPUID features whose
        instructions that emulator fails on (cpuid.EMULATED_KERNEL_HIDDEN)."""
        self.kernel_code_emulated = kernel_code_emulated
        self.kvm = kvm or Kvm()
        for cap, cap_name in REQUIRED_CAPABILITIES.items():
            self.kvm.require(cap, cap_name)
        self.vm_fd = self.kvm.create_vm()
        self._supported_cpuid = None
        self._msr_indices: set[int] | None = None
        self.memory = None
        self.vcpus: list[KvmVcpu] = []
        self._msi_router: KvmMsiRouter | None = None  # created with the first MSI vector
        self._ioeventfds = KvmIoEventFds(self.vm_fd)

    # --- machine -----------------------------------------------------------------------

    def setup_platform(self) -> None:
        """TSS/identity pages for real-mode emulation, then the in-kernel irqchip and PIT."""
        self.vm_fd.set_tss_addr(layout.KVM_TSS)
        if self.kvm.check_extension(uapi.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            self.vm_fd.set_identity_map_addr(layout.KVM_IDENTITY_MAP)
        self.vm_fd.create_irqchip()
        self.vm_fd.create_pit2()

    def map_memory(self, memory) -> None:
        self.memory = memory
        for slot, region in enumerate(memory.regions):
            try:
                self.vm_fd.set_user_memory_region(slot, region.guest_base, region.size, region.host_address)
            except KvmError as exc:
                raise KvmUnavailable(f"KVM refused guest RAM at {region.guest_base:#x} ({region.size >> 20} MiB): {exc.strerror}") from None

    def connect_buses(self, pio_bus, mmio_bus) -> None:
        """Exits reach the buses through Vm's loop; the in-kernel irqchip and PIT need no bus."""

    def irq_line(self, gsi: int) -> KvmIrqLine:
        return KvmIrqLine(self.vm_fd, gsi)

    def msi_vector(self) -> KvmMsiVector:
        """A new MSI vector (masked until configured): irqfd on its own GSI, injected in the kernel."""
        if self._msi_router is None:
            self._msi_router = KvmMsiRouter(self.vm_fd)
        return self._msi_router.vector()

    def add_ioeventfd(self, address: int, length: int, *, pio: bool = False,
                      datamatch: int | None = None, eventfd: int | None = None) -> int:
        """An eventfd (non-blocking, close-on-exec; or the caller's `eventfd`, which stays the
        caller's) KVM signals when the guest writes there, without leaving the kernel; the
        write no longer reaches the bus."""
        return self._ioeventfds.add(address, length, pio=pio, datamatch=datamatch, eventfd=eventfd)

    def remove_ioeventfd(self, fd: int, address: int, length: int, *, pio: bool = False,
                         datamatch: int | None = None) -> None:
        """Undo add_ioeventfd (same arguments) and close `fd` unless the caller passed it in."""
        self._ioeventfds.remove(fd, address, length, pio=pio, datamatch=datamatch)

    def signal_msi(self, address: int, data: int) -> bool:
        """Inject one MSI without a GSI (KVM_SIGNAL_MSI); False if the guest blocked it."""
        self.kvm.require(uapi.KVM_CAP_SIGNAL_MSI, "KVM_CAP_SIGNAL_MSI")
        return self.vm_fd.signal_msi(address, data)

    @property
    def supported_cpuid(self):
        if self._supported_cpuid is None:
            self._supported_cpuid = self.kvm.supported_cpuid()
        return self._supported_cpuid

    def create_vcpu(self, index: int, count: int, policy: CpuidPolicy) -> "KvmVcpu":
        install_kick_handler()
        vcpu = KvmVcpu(self, self.vm_fd.create_vcpu(index), index)
        if self.kernel_code_emulated:
            policy = policy.also_hiding(EMULATED_KERNEL_HIDDEN)
        vcpu.fd.set_cpuid2(kvm_guest_cpuid(self.supported_cpuid, policy, index, count, vcpu.fd.get_tsc_khz()))
        vcpu.set_msrs(msrs.boot_msrs())
        if index == 0:
            vcpu.set_virtual_wire_lints()
        self.vcpus.append(vcpu)
        return vcpu

    def supported_msrs(self) -> set[int]:
        if self._msr_indices is None:
            self._msr_indices = set(self.kvm.msr_index_list())
        return self._msr_indices

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.fd.close()
        self.vcpus.clear()
        if self._msi_router is not None:
            self._msi_router.close()
        self._ioeventfds.close()
        self.vm_fd.close()
        self.kvm.close()


class KvmVcpu:
    """One vCPU of the KVM backend: state conversion, run, kick."""

    def __init__(self, accel: KvmAccelerator, fd, index: int) -> None:
        self.accel, self.fd, self.index = accel, fd, index
        self.thread_ident: int | None = None
        self.run = fd.run  # the hot path: no extra Python frame per exit
        self.assists: dict[str, int] = {}
        self.assist_refusal = ""  # why pyvmm could not complete the last instruction it knew

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

    def set_msrs(self, values: dict[int, int]) -> None:
        supported = self.accel.supported_msrs()
        wanted = {i: v for i, v in values.items() if i in supported}
        done = self.fd.set_msrs(wanted)
        if done != len(wanted):
            refused = list(wanted)[done]
            log.warning("vCPU %d: KVM refused MSR %#x (and any after it)", self.index, refused)

    def set_virtual_wire_lints(self) -> None:
        """LINT0 = ExtINT, LINT1 = NMI on the BSP, so the 8259 reaches it before the guest programs its APIC."""
        lapic = self.fd.get_lapic()
        raw = bytearray(lapic.regs)
        for offset, mode in ((APIC_LVT0, APIC_DELIVERY_EXTINT), (APIC_LVT1, APIC_DELIVERY_NMI)):
            value = int.from_bytes(raw[offset:offset + 4], "little")
            value = (value & ~0x10700 & 0xFFFFFFFF) | mode  # unmask, set the delivery mode
            raw[offset:offset + 4] = value.to_bytes(4, "little")
        lapic.regs = bytes(raw)
        self.fd.set_lapic(lapic)

    # --- architectural state -------------------------------------------------------------

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
        """Complete an instruction KVM failed to emulate, when pyvmm knows how (kvm_assist)."""
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
