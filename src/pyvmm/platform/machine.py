"""SoftwarePlatform: the interrupt controllers and timers of a software-CPU machine, wired.

What KVM keeps in the kernel (PIC pair, PIT, IOAPIC, one LAPIC per vCPU), built
from the models in this package, registered on pyvmm's buses at the addresses the
ACPI MADT announces, and queried by the software CPU's scheduler between slices.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Final

from ..bus.bus import Bus
from ..persist import require
from .apic_bus import ApicBus
from .clock import VirtualClock
from .ioapic import IoApic
from .irq_router import IsaIrqRouter
from .lapic import LocalApic
from .machine_state import SoftwarePlatformState
from .pic import Pic8259Pair
from .pit import Pit8254

log = logging.getLogger(__name__)

PIT_PORT: Final = 0x40
PIT_SPEAKER_PORT: Final = 0x61
PIC_MASTER_PORT: Final = 0x20
PIC_SLAVE_PORT: Final = 0xA0
ELCR_PORT: Final = 0x4D0
IOAPIC_WINDOW: Final = 0x1000


def initialize_pic_like_firmware(pic: Pic8259Pair) -> None:
    """Program the 8259 pair as a PC BIOS leaves it: vectors 0x08/0x70, cascade on IR2, every
    input masked. A kernel that never touches the PIC (Linux with a hardware-reduced FADT)
    must not receive its interrupts at vectors 8-15, where the CPU's exception handlers are."""
    for ports, vector_base, cascade in ((pic.master_ports, 0x08, 0x04), (pic.slave_ports, 0x70, 0x02)):
        ports.write(0, b"\x11")                  # ICW1: edge, cascade, ICW4 follows
        ports.write(1, bytes([vector_base]))      # ICW2
        ports.write(1, bytes([cascade]))          # ICW3
        ports.write(1, b"\x01")                  # ICW4: 8086 mode
        ports.write(1, b"\xff")                  # OCW1: mask all


class SoftwarePlatform:
    def __init__(self, wakeup: Callable[[], None], tsc_hz: int, lapic_timer_hz: int) -> None:
        """`tsc_hz`: the guest TSC's rate (the accelerator knows it: Unicorn's RDTSC reads the host's);
        `lapic_timer_hz`: the LAPIC timer's input clock, the crystal CPUID 0x15 announces (Linux
        programs the timer from there)."""
        self.tsc_hz = tsc_hz
        self.lapic_timer_hz = lapic_timer_hz
        self.clock = VirtualClock(tsc_hz=self.tsc_hz)
        self.apic_bus = ApicBus()
        self.ioapic = IoApic(self.apic_bus)
        self.pic = Pic8259Pair()
        self.pic.on_wakeup = wakeup
        initialize_pic_like_firmware(self.pic)
        self.router = IsaIrqRouter(self.pic, self.ioapic)
        self.pit = Pit8254(self.router.line(0), self.clock.now_ns)
        self.lapics: list[LocalApic] = []
        self._wakeup = wakeup

    def register(self, pio_bus: Bus, mmio_bus: Bus, *, ioapic_base: int) -> None:
        """Put the ISA ports and the IOAPIC window (at `ioapic_base`, from the machine's
        layout, which the platform does not import: arch/ sits above platform/) on the buses."""
        pio_bus.register(PIC_MASTER_PORT, 2, self.pic.master_ports, "pic-master")
        pio_bus.register(PIC_SLAVE_PORT, 2, self.pic.slave_ports, "pic-slave")
        pio_bus.register(ELCR_PORT, 2, self.pic.elcr_ports, "pic-elcr")
        pio_bus.register(PIT_PORT, 4, self.pit, "pit")
        pio_bus.register(PIT_SPEAKER_PORT, 1, self.pit.port61, "pit-port61")
        mmio_bus.register(ioapic_base, IOAPIC_WINDOW, self.ioapic, "ioapic")
        # LAPICs are not on the bus: each vCPU routes its own 0xFEE00000 page to its own LAPIC.

    def irq_line(self, gsi: int):
        return self.router.gsi_line(gsi) if gsi >= 16 else self.router.line(gsi)

    def add_cpu(self, index: int) -> LocalApic:
        lapic = LocalApic(index, self.clock.now_ns, self.apic_bus, pic=self.pic if index == 0 else None,
                          bsp=index == 0, tsc_hz=self.tsc_hz, timer_hz=self.lapic_timer_hz)
        lapic.apply_firmware_defaults()  # LINT0 ExtINT / LINT1 NMI, as firmware leaves them
        lapic.on_wakeup = self._wakeup
        self.lapics.append(lapic)
        return lapic

    def remove_cpu(self, lapic: LocalApic) -> None:
        """The vCPU of `lapic` was unplugged (CPU hotplug): its LAPIC leaves the machine."""
        self.apic_bus.detach_lapic(lapic)
        self.lapics.remove(lapic)

    # --- what the scheduler asks between slices ---------------------------------------------

    def poll(self) -> None:
        now = self.clock.now_ns()
        self.pit.poll(now)
        for lapic in self.lapics:
            lapic.poll(now)

    def start_cpu_if_asked(self, vcpu) -> None:
        """Act on INIT / startup IPIs sent to this vCPU's LAPIC."""
        lapic = vcpu.lapic
        if not lapic.has_startup_events():
            return
        for event in lapic.take_startup_events():
            if event[0] == "init":
                vcpu.waiting_for_sipi = True
            elif event[0] == "sipi" and vcpu.waiting_for_sipi:
                vcpu.start_at_sipi(event[1])

    def pending_vector(self, vcpu) -> int | None:
        return vcpu.lapic.pending_vector()

    def acknowledge(self, vcpu) -> int:
        return vcpu.lapic.acknowledge()

    def seconds_to_next_deadline(self) -> float | None:
        now = self.clock.now_ns()
        soonest = self.pit.next_deadline_ns(now)
        for lapic in self.lapics:  # (a loop: no comprehension frames, asked every round)
            deadline = lapic.next_deadline_ns()
            if deadline is not None and (soonest is None or deadline < soonest):
                soonest = deadline
        if soonest is None:
            return None
        return max(soonest - now, 0) / 1e9

    # --- snapshot ---------------------------------------------------------------------------
    # The router and the APIC bus hold no state of their own (line levels live in the PIC and
    # the IOAPIC; the bus only counts messages); MSI vectors are re-programmed by the PCI
    # functions' MSI-X restore.

    def save(self) -> SoftwarePlatformState:
        """Call while paused: the clock stands still, so every part is saved at the same guest time."""
        return SoftwarePlatformState(clock=self.clock.save(), pic=self.pic.save(), pit=self.pit.save(),
                                     ioapic=self.ioapic.save(), lapics=tuple(l.save() for l in self.lapics))

    def restore(self, state: SoftwarePlatformState) -> None:
        """Load every part, all checked first. The guest TSC keeps this host's rate: a state saved
        at a rate more than 0.1% away (another host) is refused, since the guest calibrated its
        clocks against it; a smaller difference is calibration noise and is taken as this rate."""
        state = require(state, SoftwarePlatformState)
        if len(state.lapics) != len(self.lapics):
            state.fail("lapics", f"{len(state.lapics)} saved, this machine has {len(self.lapics)} vCPUs")
        if abs(state.clock.tsc_hz - self.tsc_hz) * 1000 > self.tsc_hz:
            state.fail("clock", f"the TSC ran at {state.clock.tsc_hz} Hz, this host's runs at {self.tsc_hz} Hz")
        self.ioapic.check_restorable(state.ioapic)
        self.pic.check_restorable(state.pic)
        self.clock.restore(dataclasses.replace(state.clock, tsc_hz=self.tsc_hz))
        self.pit.restore(state.pit)
        self.pic.restore(state.pic)
        self.ioapic.restore(state.ioapic)
        for lapic, lapic_state in zip(self.lapics, state.lapics):
            lapic.restore(lapic_state)
