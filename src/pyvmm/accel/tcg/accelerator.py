"""The software-CPU accelerator: Unicorn vCPUs run in turn from one thread.

All vCPUs run on one Unicorn instance (translator.py), which is not built for parallel
guests, so SMP is round-robin (as QEMU's single-threaded TCG does): each runnable vCPU gets a
time slice, then timers are serviced and pending interrupts are injected at the
next slice boundary. A slice ends early when a timer is due, and at once when
an interrupt is raised (the slice timer's kick), so interrupts are taken
promptly. When every vCPU is halted the thread sleeps until the next timer
deadline or until a device raises an interrupt — never a busy loop.

The interrupt controllers and timers KVM keeps in the kernel (8259 PIC, 8254
PIT, LAPICs, IOAPIC) are pyvmm.platform models here, wired to the same buses.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Callable

from ...arch.x86_64 import layout
from ...arch.x86_64.tsc_leaf import tsc_leaf
from ...arch.x86_64.cpu_state import GuestCpuView
from ...arch.x86_64.cpuid import guest_cpuid
from ...kvm.system import CpuidEntry
from ...persist import State, StateError, require
from ...platform.machine import SoftwarePlatform
from ...platform.machine_state import SoftwarePlatformState
from ...platform.msi import SoftwareMsiVector
from ...arch.x86_64.cpuid import CpuidPolicy
from ...bus.bus import Bus
from ...bus.interrupt import IrqLine
from ...memory.dirty import DirtyBitmap
from ...memory.guest_memory import GuestMemory
from ..base import RunLoop, Vcpu, VmServices
from ..dispatch import ExitDispatcher
from ..exits import HLT, INTERRUPTED
from .cpuid import CpuidTable, tcg_cpuid_tables
from .engine_state import engine_offsets
from .private_state import context_offsets
from .slice_timer import SliceTimer
from .translator import Translator
from .host_tsc import host_tsc_hz
from .vcpu import TcgVcpu
from . import helper_patch, vcpu_state

log = logging.getLogger(__name__)

# Seconds per turn when nothing waits to be injected; a due timer or a raised interrupt ends a turn
# early anyway. Each turn costs fixed Python work, but with 2 vCPUs one may spin waiting for the
# other: 4 ms boots 1 vCPU about as fast as 10-20 ms and 2 vCPUs faster (6.0 s vs 6.4-7.5 s).
SLICE = 0.004
WINDOW_SLICE = 0.0001   # an event pending, its window closed, no window exit (interrupt_window.py): poll soon
# While another vCPU has an interrupt to take (an IPI, typically), this one is most likely
# spinning until it has been handled (smp_call_function, TLB shootdowns): a short turn lets the
# other vCPU take it sooner. Without this, a 2-vCPU Linux boot spent a third of its slices
# spinning in smp_call_function_many_cond (a profile of the guest RIP at slice ends).
SHARED_SLICE = 0.0005
# Device writes noted beyond this many runs, with no vCPU running to drop their code, become one
# run over every address: the list stays bounded, and the next slice drops all translated RAM.
MAX_DMA_RUNS = 1 << 16
ALL_ADDRESSES = (1 << 64) - 1  # (a length, from 0)
# PYVMM_TCG_EXCEPTIONS=python: deliver guest exceptions with pyvmm's Python code (delivery.py)
# instead of the engine's own (native_delivery.py), to compare the two or to rule one out.
EXCEPTIONS_SETTING = "PYVMM_TCG_EXCEPTIONS"
# PYVMM_TCG_INTERRUPTS=python: the same for external interrupts (native_interrupts.py). (The
# restored guests that hung under load with the engine's delivery were lost kicks, which its
# speed made likelier: restore.serve_lost_kicks.)
INTERRUPTS_SETTING = "PYVMM_TCG_INTERRUPTS"
# PYVMM_TCG_SYSCALLS=python: every SYSCALL through the Python hook (vcpu.syscall), not the
# engine's machine code (native_syscall.py)
SYSCALLS_SETTING = "PYVMM_TCG_SYSCALLS"
# PYVMM_TCG_KICKS=io-thread: every kick to the I/O thread, none served in the slice that made
# it (inline_kicks.py), to compare the two or to rule one out
KICKS_SETTING = "PYVMM_TCG_KICKS"


class TcgAccelerator:
    name = "tcg"
    logs_guest_writes = False  # translated code writes through the mapping HostWriteTracker watches
    io_thread_yields = True   # a kick wakes the I/O thread from the thread running the guest
    threads_share_one_host_cpu = True  # its threads take turns on the GIL per guest event
    # Every vCPU reads the host's invariant TSC, while the jiffies Linux would check it against
    # lose ticks when the host is busy: its clocksource watchdog then declared the TSC unstable
    # and the guest kept time in jiffies (seen with 2 vCPUs on a loaded host).
    linux_cmdline = "tsc=nowatchdog"
    # Set by setup_platform() and map_memory(), before anything else uses them.
    platform: SoftwarePlatform
    memory: GuestMemory

    def __init__(self, tsc_hz: int | None = None, lapic_timer_hz: int | None = None) -> None:
        """`tsc_hz`: the rate of the guest's TSC, which Unicorn's RDTSC reads from the host's
        (default: the host's rate, host_tsc.py). `lapic_timer_hz`: the LAPIC timer's input
        clock (default: the crystal of CPUID leaf 0x15, tsc_leaf.py); KVM's 1 GHz
        (tsc_leaf.KVM_APIC_BUS_HZ) makes a guest that can move to KVM (accel/cross.py)."""
        self.tsc_hz = tsc_hz
        self.lapic_timer_hz = lapic_timer_hz
        self._kept_view: GuestCpuView | None = None  # a state from another accelerator: its CPUID
        self.offsets = context_offsets()
        self.engine_offsets = engine_offsets()
        self._dispatch: ExitDispatcher | None = None
        self.vcpus: list[TcgVcpu] = []
        self._tables: list[CpuidTable] | None = None
        self._translator: Translator | None = None  # made with the first vCPU (memory and buses exist then)
        # Wakes the scheduler from its sleep between rounds (at most a few items: see _wake). A
        # queue's put and get are C, where an Event's set and wait were ~8 Python frames each, once
        # per device interrupt that ends a HLT (a 4 KiB disk request).
        self._wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._slice_timer = SliceTimer()
        self._dma_lock = threading.Lock()
        self._dma_writes: list[tuple[int, int]] = []  # (address, length) devices wrote
        # what serve_device_work() leaves for the slice's end (in order, each once) and whether it serves at all
        self._after_slice: dict[Callable[[], object], None] = {}
        self.slice_ended_at_hlt = False  # (for those callbacks: serve_device_work)
        self._serves_kicks = os.environ.get(KICKS_SETTING, "") != "io-thread"

    # --- machine ---------------------------------------------------------------------------

    def setup_platform(self) -> None:
        tsc_hz = self.tsc_hz or host_tsc_hz()
        self.platform = SoftwarePlatform(wakeup=self._wake, tsc_hz=tsc_hz,
                                         lapic_timer_hz=self.lapic_timer_hz or tsc_leaf(tsc_hz).crystal_hz)

    def _wake(self) -> None:
        """An interrupt was raised, or the VM must stop or pause (any thread): end the running
        slice, wake a sleeping scheduler."""
        running = getattr(helper_patch.running, "vcpu", None)
        if running is None:
            # (from inside a slice the scheduler is not asleep: it looks after the slice). One item
            # wakes it; racing wakers may leave another, which only costs a round that finds nothing.
            if self._wakeups.empty():
                self._wakeups.put(None)
        elif self.vcpus == [running] and running.wait_for_window():
            return  # raised by the running vCPU's own I/O: the engine takes it where IF allows
        self._slice_timer.kick()

    def map_memory(self, memory: GuestMemory) -> None:
        self.memory = memory
        memory.on_device_writes = self._note_device_writes

    def _note_device_writes(self, runs: list[tuple[int, int]]) -> None:
        """Device DMA bypasses the translator's self-modifying-code detection: remember what
        it wrote, whose translated code is dropped before the next slice (any thread)."""
        with self._dma_lock:
            self._dma_writes += runs
            if len(self._dma_writes) > MAX_DMA_RUNS:  # (no vCPU ran for a long while)
                self._dma_writes = [(0, ALL_ADDRESSES)]

    def serve_device_work(self, work: Callable[[], bool], after: Callable[[], object]) -> bool:
        """In the running slice, on its vCPU's thread (not with PYVMM_TCG_KICKS=io-thread).
        The code translated from what the device wrote is dropped before the guest runs on;
        `after` runs when the slice ends, so what the guest does meanwhile (more requests, as
        at a deeper queue) is served with one interrupt, and a guest waiting for its request
        gets the interrupt at its HLT, without a hand-off to the I/O thread and back (or at
        once: end_running_slice)."""
        vcpu = getattr(helper_patch.running, "vcpu", None)
        if vcpu is None or not self._serves_kicks or not work():
            return False
        if self._dma_writes:
            self._drop_stale_code()
        self._after_slice[after] = None
        vcpu.stats["kicks_served"] += 1
        return True

    def end_running_slice(self) -> None:
        vcpu = getattr(helper_patch.running, "vcpu", None)
        if vcpu is not None:
            vcpu.slice_timer.kick()  # (the engine stops where the block with the guest's write ends)
            vcpu.stats["slices_ended_by_kicks"] += 1

    def _finish_slice_work(self) -> None:
        after, self._after_slice = self._after_slice, {}
        for finish in after:
            finish()

    def _drop_stale_code(self) -> None:
        with self._dma_lock:
            runs, self._dma_writes = self._dma_writes, []
        translator = self._translator
        if translator is not None:  # (else no vCPU yet: nothing translated)
            translator.translated_code.drop_written(runs)

    # Translated code writes guest RAM through this process's mapping (Unicorn maps it by
    # pointer), where the Vm's HostWriteTracker sees every write: no log of its own.
    def start_dirty_log(self) -> None:
        pass

    def collect_dirty_log(self, into: DirtyBitmap) -> None:
        pass

    def stop_dirty_log(self) -> None:
        pass

    def connect_buses(self, pio_bus: Bus, mmio_bus: Bus) -> None:
        self._dispatch = ExitDispatcher(pio_bus, mmio_bus)
        self.platform.register(pio_bus, mmio_bus, ioapic_base=layout.IOAPIC_BASE)

    def irq_line(self, gsi: int) -> IrqLine:
        return self.platform.irq_line(gsi)

    def msi_vector(self) -> SoftwareMsiVector:
        """A new MSI vector (masked until configured), delivered over the platform's APIC bus."""
        return SoftwareMsiVector(self.platform.apic_bus)

    def add_ioeventfd(self, address: int, length: int, *, pio: bool = False,
                      datamatch: int | None = None, eventfd: int | None = None) -> None:
        """No shortcut here: the guest's write reaches the bus as usual."""
        return None

    def remove_ioeventfd(self, fd: int | None, address: int, length: int, *, pio: bool = False,
                         datamatch: int | None = None) -> None:
        pass

    def create_vcpu(self, index: int, count: int, policy: CpuidPolicy) -> TcgVcpu:
        if self._tables is None and self._kept_view is not None:
            kept = self._kept_view.entries()
            self._tables = [CpuidTable(guest_cpuid(kept, CpuidPolicy(), i, count)) for i in range(count)]
        elif self._tables is None:
            self._tables = tcg_cpuid_tables(policy, count, self.platform.tsc_hz, self.lapic_timer_hz)
        if self._translator is None:
            native = os.environ.get(EXCEPTIONS_SETTING, "native") != "python"
            if not native:
                log.info("software CPU: exceptions are delivered in Python (%s=python)", EXCEPTIONS_SETTING)
            native_interrupts = native and os.environ.get(INTERRUPTS_SETTING, "native") != "python"
            native_syscalls = os.environ.get(SYSCALLS_SETTING, "native") != "python"
            self._translator = Translator(self.memory, self._bound_dispatch(), self.offsets,
                                          self.engine_offsets, self._slice_timer, native_exceptions=native,
                                          native_interrupts=native_interrupts, native_syscalls=native_syscalls)
        vcpu = TcgVcpu(index, self._translator, self._tables[index], self.platform.add_cpu(index))
        vcpu.wake = self._wake  # a stop or pause request must end the slice or wake a sleeping scheduler
        if self.vcpus and self.vcpus[0].frozen_tsc is not None:
            vcpu.frozen_tsc = self.vcpus[0].frozen_tsc  # plugged in while paused: the others' TSC on resume
        self.vcpus.append(vcpu)
        return vcpu

    def remove_vcpu(self, vcpu: Vcpu) -> None:
        """Unplug `vcpu` (CPU hotplug, the VM paused): the scheduler runs it no more, its LAPIC
        leaves the machine. Only the highest-numbered vCPU goes: indices stay contiguous."""
        if vcpu is not self.vcpus[-1] or vcpu.index == 0:
            raise ValueError(f"vCPU {vcpu.index} is not the last one, or is the boot CPU")
        removed = self.vcpus.pop()
        self.platform.remove_cpu(removed.lapic)
        if self._translator is not None:
            self._translator.forget(removed)
        removed.close()

    # --- what the guest sees of its CPU (kept across accelerators: accel/cross.py) ----------

    def guest_view(self) -> GuestCpuView:
        assert self._tables is not None, "the vCPUs exist"
        return GuestCpuView.of(self._tables[0].entries, self.platform.tsc_hz // 1000, self.platform.lapic_timer_hz)

    def offered_cpuid(self, policy: CpuidPolicy, count: int) -> list[CpuidEntry]:
        """The CPUID the software CPU would give vCPU 0 of a new machine with `policy`."""
        return tcg_cpuid_tables(policy, count, self.tsc_hz or host_tsc_hz(), self.lapic_timer_hz)[0].entries

    def keep_guest_view(self, view: GuestCpuView) -> None:
        """The machine built next shows `view`'s CPUID and runs its LAPIC timer at its rate; a
        TSC rate other than the host's is refused (RDTSC reads the host's TSC, unscaled)."""
        tsc_hz = self.tsc_hz or host_tsc_hz()
        if abs(view.tsc_khz * 1000 - tsc_hz) * 1000 > tsc_hz:
            raise StateError(f"vm state: guest_view.tsc_khz: the guest's TSC ran at {view.tsc_khz} kHz, the software "
                             f"CPU's reads this host's at {tsc_hz // 1000} kHz and cannot scale it")
        self.lapic_timer_hz = view.lapic_timer_hz
        self._kept_view = view

    def save(self) -> SoftwarePlatformState:
        """The VM-wide state: the platform (PICs, PIT, IOAPIC, LAPICs, guest clock). The
        translator keeps nothing else between slices: its code cache is rebuilt from memory."""
        return self.platform.save()

    def restore(self, state: State) -> None:
        self.platform.restore(require(state, SoftwarePlatformState))  # (the seam takes any state)

    def close(self) -> None:
        self._slice_timer.close()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self._translator is not None:
            self._translator.close()
            self._translator = None

    # --- the scheduler ---------------------------------------------------------------------------

    def _bound_dispatch(self) -> ExitDispatcher:
        if self._dispatch is None:
            raise RuntimeError("connect_buses() comes before the vCPUs and the run loops")
        return self._dispatch

    def _other_vcpu_has_interrupt(self, vcpu: TcgVcpu) -> bool:
        platform = self.platform
        return any(other is not vcpu and not other.waiting_for_sipi and platform.pending_vector(other) is not None
                   for other in self.vcpus)

    def _others_runnable(self, vcpu: TcgVcpu) -> bool:
        """Another vCPU would run if this one's slice ended: not halted, or woken by an interrupt."""
        platform = self.platform
        return any(other is not vcpu and not other.waiting_for_sipi
                   and (not other.halted or platform.pending_vector(other) is not None) for other in self.vcpus)

    def run_loops(self, vm: VmServices) -> list[RunLoop]:
        """One thread runs every vCPU in turn (the engine is not built for parallel guests)."""
        self._bound_dispatch().vm = vm
        return [RunLoop(f"vcpus-{self.name}", self.name, lambda: self._schedule(vm), list(self.vcpus), "tcg")]

    def guest_clock_ns(self) -> int:
        return self.platform.clock.now_ns()

    def freeze_time(self) -> None:
        """Paused: the platform's clock stands still, so no PIT or LAPIC timer comes due (the
        scheduler is parked: nothing polls the timers), and each vCPU's TSC is held where it
        stood (Linux keeps time with the TSC: it would jump by the pause otherwise)."""
        self.platform.clock.pause()
        vcpu_state.freeze_tscs(self.vcpus)

    def thaw_time(self) -> None:
        vcpu_state.thaw_tscs(self.vcpus)
        self.platform.clock.resume()

    def _schedule(self, vm: VmServices) -> None:
        """Run every vCPU in turn until the VM stops; park between rounds while it is paused."""
        platform, vcpus, wakeups, dispatch = self.platform, self.vcpus, self._wakeups, self._bound_dispatch()
        assert self._translator is not None, "the vCPUs exist"
        spin_loops = self._translator.spin_loops
        stopped = vm.stop_requested
        while not stopped.is_set():
            vm.pause_point()
            platform.poll()
            progressed = False
            for vcpu in vcpus:
                if stopped.is_set() or vm.pause_requested:
                    break
                platform.start_cpu_if_asked(vcpu)
                if vcpu.waiting_for_sipi:
                    continue
                nmi_held = False
                if vcpu.lapic.nmi_pending:
                    if vcpu.nmi_window_open():
                        if vcpu.lapic.take_nmi():
                            vcpu.inject_nmi()
                    else:
                        nmi_held = True
                pending = platform.pending_vector(vcpu)
                if pending is not None and vcpu.interrupt_window_open():
                    vcpu.inject_interrupt(platform.acknowledge(vcpu))
                    pending = platform.pending_vector(vcpu)
                if vcpu.halted:
                    continue
                if self._dma_writes:
                    self._drop_stale_code()
                windows = vcpu.translator.interrupt_requests is not None
                if windows and (pending is not None or nmi_held):
                    # the engine stops (or delivers an NMI) exactly where the window opens
                    vcpu.want_interrupt_window = pending is not None
                    vcpu.want_nmi_window = nmi_held and vcpu.nmi_blocked_until_iret()
                if (pending is not None and not windows) or (nmi_held and not vcpu.want_nmi_window):
                    seconds = WINDOW_SLICE
                elif len(vcpus) > 1 and (vcpu.spinning or self._other_vcpu_has_interrupt(vcpu)):
                    seconds = SHARED_SLICE
                else:
                    due = platform.seconds_to_next_deadline()
                    seconds = SLICE if due is None or due > SLICE else due
                spin_loops.arm(len(vcpus) > 1 and self._others_runnable(vcpu))
                exit_ = vcpu.run(seconds)
                if self._after_slice:
                    self.slice_ended_at_hlt = exit_ is HLT
                    self._finish_slice_work()
                if len(vcpus) > 1:
                    vcpu.spinning = exit_ is INTERRUPTED and spin_loops.at_pause(vcpu)
                    if vcpu.spinning:
                        spin_loops.learn(vcpu)  # its next turns end at this PAUSE while others can run
                progressed = True
                if not (exit_ is INTERRUPTED or exit_ is HLT):
                    dispatch(vcpu, exit_)  # an exit that ends the VM
            if not progressed and not vm.pause_requested:
                try:
                    wakeups.get(timeout=platform.seconds_to_next_deadline())
                except queue.Empty:
                    pass  # a timer is due
