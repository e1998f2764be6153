"""KvmAccelerator: guest code runs on the host CPU through /dev/kvm.

Owns the VM fd and the vCPU fds; uses KVM's in-kernel irqchip (PIC, IOAPIC,
LAPICs) and PIT, so timers and interrupt routing cost no Python. Each vCPU runs in its
own thread (vcpu.py), its exits served by the shared ExitDispatcher.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import signal
import threading

from ...arch.x86_64 import layout, msrs
from ...arch.x86_64.cpu_state import GuestCpuView
from ...arch.x86_64.cpuid import EMULATED_KERNEL_HIDDEN, CpuidPolicy, guest_cpuid, kvm_guest_cpuid
from ...arch.x86_64.tsc_leaf import KVM_APIC_BUS_HZ
from ...bus.bus import Bus
from ...kvm import Kvm, KvmError, KvmUnavailable, uapi
from ...kvm.system import CpuidEntry
from ...memory.dirty import DirtyBitmap, DirtyTrackingUnavailable
from ...memory.guest_memory import GuestMemory
from ...persist import State, StateError, require
from ..base import RunLoop, Vcpu, VmServices
from ..dispatch import ExitDispatcher
from . import state as kvm_state
from .interrupts import KvmIoEventFds, KvmMsiRouter, KvmMsiVector
from .vcpu import KICK_SIGNAL, KvmVcpu

log = logging.getLogger(__name__)

_kick_handler_installed = False

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
    """Owns the VM fd and the vCPU fds; runs one thread per vCPU, each in KVM_RUN."""

    name = "kvm"
    logs_guest_writes = True  # KVM_MEM_LOG_DIRTY_PAGES
    io_thread_yields = False  # kicks are ioeventfds: the vCPU stays in the guest meanwhile
    threads_share_one_host_cpu = False  # vCPUs run guest code in KVM_RUN, without the GIL
    slice_ended_at_hlt = False  # (no slices: serve_device_work never serves here)
    linux_cmdline = ""
    memory: GuestMemory  # set by map_memory()

    def __init__(self, kvm: Kvm | None = None, *, kernel_code_emulated: bool = False) -> None:
        """`kernel_code_emulated`: this host's KVM emulates guest kernel code (the calibration
        of accel.select says so); the guest then does not see the CPUID features whose
        instructions that emulator fails on (cpuid.EMULATED_KERNEL_HIDDEN)."""
        self.kernel_code_emulated = kernel_code_emulated
        self.kvm = kvm or Kvm()
        for cap, cap_name in REQUIRED_CAPABILITIES.items():
            self.kvm.require(cap, cap_name)
        self.vm_fd = self.kvm.create_vm()
        self._supported_cpuid: list[CpuidEntry] | None = None
        self._msr_indices: set[int] | None = None
        self._xsave_size: int | None | bool = False  # False: not asked yet
        self.vcpus: list[KvmVcpu] = []
        self._unplugged: dict[int, KvmVcpu] = {}  # index -> a vCPU taken out (remove_vcpu), kept for its return
        self._msi_router: KvmMsiRouter | None = None  # created with the first MSI vector
        self._ioeventfds = KvmIoEventFds(self.vm_fd)
        self._dispatch: ExitDispatcher | None = None
        self._frozen_clock_ns: int | None = None  # kvm-clock where the guest stopped, while paused
        self._dirty_words: list[ctypes.Array] = []  # per slot, KVM_GET_DIRTY_LOG's buffer while logging
        self._cpuid_tables: list[list[CpuidEntry]] = []  # what each vCPU was given
        self._kept_view: GuestCpuView | None = None  # a state from another accelerator: its CPUID and TSC rate

    # --- machine -----------------------------------------------------------------------

    def setup_platform(self) -> None:
        """TSS/identity pages for real-mode emulation, then the in-kernel irqchip and PIT."""
        self.vm_fd.set_tss_addr(layout.KVM_TSS)
        if self.kvm.check_extension(uapi.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            self.vm_fd.set_identity_map_addr(layout.KVM_IDENTITY_MAP)
        self.vm_fd.create_irqchip()
        self.vm_fd.create_pit2()

    def map_memory(self, memory: GuestMemory) -> None:
        self.memory = memory
        for slot, region in enumerate(memory.regions):
            try:
                self.vm_fd.set_user_memory_region(slot, region.guest_base, region.size, region.host_address)
            except KvmError as exc:
                raise KvmUnavailable(f"KVM refused guest RAM at {region.guest_base:#x} ({region.size >> 20} MiB): {exc.strerror}") from None

    def _set_dirty_logging(self, on: bool) -> None:
        flags = uapi.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        for slot, region in enumerate(self.memory.regions):
            try:
                self.vm_fd.set_user_memory_region(slot, region.guest_base, region.size, region.host_address, flags)
            except KvmError as exc:
                raise DirtyTrackingUnavailable(f"KVM refused to log the dirty pages of guest RAM at {region.guest_base:#x}: {exc.strerror}") from None

    def start_dirty_log(self) -> None:
        """KVM_MEM_LOG_DIRTY_PAGES on every slot: KVM logs the pages the guest writes (its
        writes go through KVM's mappings, not necessarily through this process's)."""
        self._set_dirty_logging(True)
        self._dirty_words = [(uapi.u64 * ((region.size // 4096 + 63) // 64))() for region in self.memory.regions]

    def collect_dirty_log(self, into: DirtyBitmap) -> None:
        """KVM_GET_DIRTY_LOG per slot: returns the log and write-protects those pages again."""
        for slot, (region, words) in enumerate(zip(self.memory.regions, self._dirty_words)):
            self.vm_fd.get_dirty_log(slot, words)
            into.merge_words(int(region.guest_base), bytes(words))

    def stop_dirty_log(self) -> None:
        self._set_dirty_logging(False)
        self._dirty_words = []

    def connect_buses(self, pio_bus: Bus, mmio_bus: Bus) -> None:
        """Exits reach the buses through the dispatcher; the in-kernel irqchip and PIT need no bus."""
        self._dispatch = ExitDispatcher(pio_bus, mmio_bus)

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
    def supported_cpuid(self) -> list[CpuidEntry]:
        if self._supported_cpuid is None:
            self._supported_cpuid = self.kvm.supported_cpuid()
        return self._supported_cpuid

    def create_vcpu(self, index: int, count: int, policy: CpuidPolicy) -> "KvmVcpu":
        """vCPU `index` of `count` possible ones; one unplugged before comes back instead (its fd,
        state and parked thread): the guest restarts it with INIT and SIPI, as a new one."""
        unplugged = self._unplugged.pop(index, None)
        if unplugged is not None:
            unplugged.unplugged = False
            self.vcpus.append(unplugged)
            return unplugged
        install_kick_handler()
        vcpu = KvmVcpu(self, self.vm_fd.create_vcpu(index), index)
        tsc_khz = vcpu.fd.get_tsc_khz()
        if self._kept_view is not None:
            self._keep_tsc_rate(vcpu.fd, tsc_khz, self._kept_view.tsc_khz)
            table = guest_cpuid(self._kept_view.entries(), CpuidPolicy(), index, count)
        else:
            if self.kernel_code_emulated:
                policy = policy.also_hiding(EMULATED_KERNEL_HIDDEN)
            table = kvm_guest_cpuid(self.supported_cpuid, policy, index, count, tsc_khz)
        vcpu.fd.set_cpuid2(table)
        self._cpuid_tables.append(table)
        vcpu.set_msrs(msrs.boot_msrs())
        if index == 0:
            vcpu.set_virtual_wire_lints()
        else:
            # KVM builds its APIC ID map (physical-destination IPIs) while creating the vCPU, before
            # it counts as online: without another LAPIC write a vCPU added to a VM that already
            # has one never gets the INIT and SIPI sent to its APIC ID. KVM_SET_LAPIC rebuilds it.
            vcpu.fd.set_lapic(vcpu.fd.get_lapic())
        self.vcpus.append(vcpu)
        return vcpu

    def remove_vcpu(self, vcpu: Vcpu) -> None:
        """Unplug `vcpu` (CPU hotplug, the VM paused). KVM cannot destroy a vCPU: it stays kicked,
        its thread parks (VmServices.unplugged_point) and it never enters the guest again until
        create_vcpu() brings it back. Only the highest-numbered vCPU goes: indices stay contiguous."""
        if vcpu is not self.vcpus[-1] or vcpu.index == 0:
            raise ValueError(f"vCPU {vcpu.index} is not the last one, or is the boot CPU")
        unplugged = self.vcpus.pop()
        self._unplugged[unplugged.index] = unplugged
        unplugged.unplugged = True
        unplugged.kick()

    # --- what the guest sees of its CPU (kept across accelerators: accel/cross.py) ----------

    def guest_view(self) -> GuestCpuView:
        """vCPU 0's CPUID as given, the vCPUs' TSC rate and the in-kernel LAPIC timer's 1 GHz."""
        return GuestCpuView.of(self._cpuid_tables[0], self.vcpus[0].fd.get_tsc_khz(), KVM_APIC_BUS_HZ)

    def offered_cpuid(self, policy: CpuidPolicy, count: int) -> list[CpuidEntry]:
        """The CPUID this host's KVM would give vCPU 0 of a new machine with `policy`."""
        if self.kernel_code_emulated:
            policy = policy.also_hiding(EMULATED_KERNEL_HIDDEN)
        return kvm_guest_cpuid(self.supported_cpuid, policy, 0, count)

    def keep_guest_view(self, view: GuestCpuView) -> None:
        """The vCPUs created from now on show `view`'s CPUID and run their TSC at its rate (scaled
        with KVM_SET_TSC_KHZ where it differs); refused with one line where KVM cannot."""
        if view.lapic_timer_hz != KVM_APIC_BUS_HZ:
            raise StateError(f"vm state: guest_view.lapic_timer_hz: the guest's LAPIC timer counted at "
                             f"{view.lapic_timer_hz} Hz (its CPUID leaf 0x15 says so), KVM's in-kernel LAPIC "
                             f"timer counts at {KVM_APIC_BUS_HZ} Hz")
        self._kept_view = view

    def _keep_tsc_rate(self, fd, khz: int, wanted_khz: int) -> None:
        if abs(khz - wanted_khz) * 1000 <= wanted_khz:  # within 0.1%: calibration noise
            return
        if not self.kvm.check_extension(uapi.KVM_CAP_TSC_CONTROL):
            raise StateError(f"vm state: guest_view.tsc_khz: the guest's TSC ran at {wanted_khz} kHz, this host's "
                             f"KVM runs vCPUs at {khz} kHz and cannot scale it (no KVM_CAP_TSC_CONTROL)")
        try:
            fd.set_tsc_khz(wanted_khz)
        except KvmError as exc:
            raise StateError(f"vm state: guest_view.tsc_khz: this host's KVM refused to run the TSC at the guest's "
                             f"{wanted_khz} kHz ({exc.strerror})") from None

    def supported_msrs(self) -> set[int]:
        if self._msr_indices is None:
            self._msr_indices = set(self.kvm.msr_index_list())
        return self._msr_indices

    @property
    def xsave_size(self) -> int | None:
        """Bytes of a vCPU's XSAVE area (KVM_CAP_XSAVE2 asked on the VM fd), None without XSAVE."""
        if self._xsave_size is False:
            size = self.vm_fd.check_extension(uapi.KVM_CAP_XSAVE2)
            if size <= 0:
                size = 4096 if self.vm_fd.check_extension(uapi.KVM_CAP_XSAVE) > 0 else 0
            self._xsave_size = max(size, 4096) if size else None
        assert self._xsave_size is not True
        return self._xsave_size

    def save(self) -> kvm_state.KvmVmState:
        """KVM's VM-wide state: the in-kernel PICs, IOAPIC and PIT, and kvm-clock (vCPUs out of the
        guest). While paused, the clock saved is the one the guest stopped at."""
        state = kvm_state.save_vm(self.vm_fd)
        if self._frozen_clock_ns is not None:
            state = dataclasses.replace(state, clock_ns=self._frozen_clock_ns)
        return state

    def restore(self, state: State) -> None:
        vm_state = require(state, kvm_state.KvmVmState)  # (the seam takes any state: the Vm's platform part)
        kvm_state.restore_vm(self.vm_fd, vm_state)
        if self._frozen_clock_ns is not None:  # restored while paused: resume from the restored clock
            self._frozen_clock_ns = vm_state.clock_ns

    # --- running ---------------------------------------------------------------------------

    def run_loops(self, vm: VmServices) -> list[RunLoop]:
        """One thread per vCPU, each in its own KVM_RUN loop (the GIL is released in the ioctl)."""
        dispatch = self._dispatch
        if dispatch is None:
            raise RuntimeError("connect_buses() comes before the run loops")
        dispatch.vm = vm
        return [RunLoop(f"vcpu{vcpu.index}", f"vCPU {vcpu.index}",
                        functools.partial(vcpu.run_loop, vm, dispatch), [vcpu])
                for vcpu in self.vcpus]

    def guest_clock_ns(self) -> int:
        """kvm-clock now; while paused, the value the guest will resume from (KVM's own
        clock runs on until thaw_time() sets it back)."""
        if self._frozen_clock_ns is not None:
            return self._frozen_clock_ns
        return self.vm_fd.get_clock().clock

    def freeze_time(self) -> None:
        """Remember kvm-clock (KVM_GET_CLOCK) while the VM is paused, so that resuming sets it
        back: the guest's kvm-clock does not advance while paused."""
        if self.kvm.check_extension(uapi.KVM_CAP_ADJUST_CLOCK):
            self._frozen_clock_ns = self.vm_fd.get_clock().clock

    def thaw_time(self) -> None:
        if self._frozen_clock_ns is not None:
            self.vm_fd.set_clock(self._frozen_clock_ns)
            self._frozen_clock_ns = None

    def serve_device_work(self, work, after) -> bool:
        """Never here: a kick is an ioeventfd the I/O thread serves, and one that reaches a
        transport (before its ioeventfd is in place) goes there too."""
        return False

    def end_running_slice(self) -> None:
        """Nothing: serve_device_work never serves here."""

    def close(self) -> None:
        for vcpu in [*self.vcpus, *self._unplugged.values()]:
            vcpu.fd.close()
        self.vcpus.clear()
        self._unplugged.clear()
        if self._msi_router is not None:
            self._msi_router.close()
        self._ioeventfds.close()
        self.vm_fd.close()
        self.kvm.close()


