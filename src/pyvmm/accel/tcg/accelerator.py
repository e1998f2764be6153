"""The software-CPU accelerator: Unicorn vCPUs run in turn from one thread.

One Unicorn instance is one vCPU and is not built for parallel guests, so SMP
is round-robin (as QEMU's single-threaded TCG does): each runnable vCPU gets a
slice of instructions, then timers are serviced and pending interrupts are
injected at the next slice boundary. When every vCPU is halted the thread
sleeps until the next timer deadline or until a device raises an interrupt —
never a busy loop.

The interrupt controllers and timers KVM keeps in the kernel (8259 PIC, 8254
PIT, LAPICs, IOAPIC) are pyvmm.platform models here, wired to the same buses.
"""

from __future__ import annotations

import logging
import threading

from ...platform.machine import SoftwarePlatform
from ...platform.msi import SoftwareMsiVector
from .cpuid import tcg_cpuid_tables
from .private_state import context_offsets
from .vcpu import _HLT, _INTERRUPTED, TcgVcpu

log = logging.getLogger(__name__)

# Instructions per turn when nothing waits to be injected: about 1 ms of guest code here, well
# under a 4 ms timer tick. Each turn costs fixed Python work, so longer turns boot faster (clearly
# from 20k to 100k, on 1 and 2 vCPUs; little more beyond), at the price of interrupt latency.
SLICE = 100_000
WINDOW_SLICE = 200      # with an interrupt pending but IF=0: check again soon (interrupt window)


class TcgAccelerator:
    name = "tcg"
    per_vcpu_threads = False

    def __init__(self) -> None:
        self.offsets = context_offsets()
        self.memory = None
        self.pio_bus = self.mmio_bus = None
        self.platform = None
        self.vcpus: list[TcgVcpu] = []
        self._tables = None
        self._wakeup = threading.Event()
        self._dma_lock = threading.Lock()
        self._dma_pages: set[int] = set()

    # --- machine ---------------------------------------------------------------------------

    def setup_platform(self) -> None:
        self.platform = SoftwarePlatform(wakeup=self._wakeup.set)

    def map_memory(self, memory) -> None:
        self.memory = memory
        memory.on_device_write = self._note_device_write

    def _note_device_write(self, address: int, length: int) -> None:
        """Device DMA bypasses the translator's self-modifying-code detection: remember the
        pages, whose translated code is dropped before the next slice (any thread)."""
        first, last = address >> 12, (address + length - 1) >> 12
        with self._dma_lock:
            self._dma_pages.update(range(first, last + 1))

    def _drop_stale_code(self) -> None:
        with self._dma_lock:
            pages, self._dma_pages = self._dma_pages, set()
        ranges: list[list[int]] = []
        for page in sorted(pages):
            if ranges and ranges[-1][1] == page:
                ranges[-1][1] = page + 1
            else:
                ranges.append([page, page + 1])
        for first, end in ranges:
            for vcpu in self.vcpus:
                vcpu.translated_code.drop(first << 12, end << 12)

    def connect_buses(self, pio_bus, mmio_bus) -> None:
        self.pio_bus, self.mmio_bus = pio_bus, mmio_bus
        self.platform.register(pio_bus, mmio_bus)

    def irq_line(self, gsi: int):
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

    def create_vcpu(self, index: int, count: int, policy) -> TcgVcpu:
        if self._tables is None:
            self._tables = tcg_cpuid_tables(policy, count, self.platform.tsc_hz, self.platform.lapic_timer_hz)
        vcpu = TcgVcpu(index, self.memory, self.pio_bus, self.mmio_bus, self.offsets, self._tables[index],
                       self.platform.add_cpu(index))
        vcpu.kick = self._wakeup.set  # a stop or pause request must wake a sleeping scheduler
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()

    # --- the scheduler ---------------------------------------------------------------------------

    def run(self, vm) -> None:
        """Run every vCPU in turn until the VM stops."""
        platform, vcpus, wakeup = self.platform, self.vcpus, self._wakeup
        while not vm.stopped:
            vm.wait_while_paused()
            platform.poll()
            progressed = False
            for vcpu in vcpus:
                if vm.stopped:
                    return
                platform.start_cpu_if_asked(vcpu)
                if vcpu.waiting_for_sipi:
                    continue
                pending = platform.pending_vector(vcpu)
                if pending is not None and vcpu.interrupt_window_open():
                    vcpu.inject_interrupt(platform.acknowledge(vcpu))
                    pending = platform.pending_vector(vcpu)
                if vcpu.halted:
                    continue
                if self._dma_pages:
                    self._drop_stale_code()
                exit_ = vcpu.run(WINDOW_SLICE if pending is not None else SLICE)
                progressed = True
                if not (exit_ is _INTERRUPTED or exit_ is _HLT):
                    vm.guest_event(vcpu, exit_)
            if not progressed:
                wakeup.wait(platform.seconds_to_next_deadline())
                wakeup.clear()

