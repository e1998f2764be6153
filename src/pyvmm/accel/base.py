"""The accelerator seam: what an accelerator, its vCPUs and the VM offer one another.

An accelerator (KVM, the software CPU) runs guest code; the Vm (vm.py) decides what the
VM's life looks like. Between them:

- `Accelerator`: builds the machine's CPU side (platform, memory mapping, interrupt lines,
  vCPUs) and, when the VM starts, hands the Vm its `RunLoop`s: each is the body of one
  thread the Vm starts, owned by the accelerator (one per vCPU on KVM, one scheduler for
  all vCPUs on the software CPU). Each loop serves exits through one ExitDispatcher.
- `Vcpu`: one virtual CPU, as the Vm and the builder see it.
- `VmServices`: everything a run loop may ask of the Vm while it runs. Nothing else of the
  Vm is reachable from an accelerator.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..arch.x86_64.cpu_state import CpuState, GuestCpuView, VcpuState
from ..arch.x86_64.cpuid import CpuidPolicy
from ..bus.bus import Bus
from ..bus.interrupt import IrqLine, MsiVector
from ..kvm.system import CpuidEntry
from ..memory.dirty import DirtyBitmap
from ..memory.guest_memory import GuestMemory
from ..persist import State
from .exits import VcpuExit


class VmServices(Protocol):
    """What the Vm offers its accelerator's run loops."""

    # Set once the VM is stopping: every run loop returns soon after. Whoever sets it (as for a
    # pause) also kicks the vCPUs: a KVM vCPU serving port I/O looks at it only when kicked.
    stop_requested: threading.Event
    @property
    def symbols(self) -> object | None:
        """The guest kernel's symbols (loader.linux.symbols) for error messages, or None."""

    @property
    def pause_requested(self) -> bool:
        """A pause is wanted: leave the guest and reach the pause point soon."""

    def pause_point(self) -> None:
        """Between two guest runs, outside the guest: while the VM is paused, acknowledge
        the pause barrier and wait here until it resumes or stops."""

    def guest_exit(self, vcpu: "Vcpu", exit_: VcpuExit) -> None:
        """An exit the dispatcher does not serve itself: it ends the VM."""

    def unplugged_point(self, unplugged: Callable[[], bool]) -> None:
        """Outside the guest, for a vCPU taken out of the machine whose thread stays (KVM cannot
        destroy a vCPU): wait while `unplugged()` holds and the VM runs, not counted by the pause
        barrier meanwhile."""


@dataclass(frozen=True)
class VcpuCounters:
    """One vCPU's counters since it was made, for stats and top."""
    exits: dict[str, int]              # VM exits by reason (reasons with a count only)
    source: str                        # kvm-binary-stats | pyvmm (exits KVM handed to pyvmm) | software-cpu
    interrupts_injected: int | None    # interrupts and NMIs delivered to the guest; None: not known


class Vcpu(Protocol):
    index: int
    thread_ident: int | None  # the thread running it, so that kick() can reach it

    def kick(self) -> None:
        """Make the vCPU leave the guest now, or at once on its next entry (any thread)."""

    def clear_kick(self) -> None:
        """Forget a kick that has not been consumed (on resume)."""

    @property
    def exit_counts(self) -> dict[str, int]: ...

    def counters(self) -> VcpuCounters:
        """Exits by reason and interrupts injected, from the best source the host has."""

    def set_state(self, state: CpuState) -> None: ...

    def get_state(self) -> CpuState: ...

    def save(self) -> VcpuState:
        """The complete vCPU state (out of the guest: paused or stopped)."""

    def restore(self, state: VcpuState) -> None: ...

    def describe_position(self) -> str:
        """Where the guest is, one line for error messages."""


@dataclass
class RunLoop:
    """The body of one thread the Vm starts: `run()` returns when the VM stops."""

    name: str                       # the thread's name
    label: str                      # how errors name it ("vCPU 0", "tcg")
    run: Callable[[], None]
    vcpus: list[Vcpu] = field(default_factory=list)  # the vCPUs this thread runs
    seccomp_kind: str = "vcpu"      # its filter in seccomp/allowlist.py: vcpu (KVM) or tcg


class Accelerator(Protocol):
    name: str
    linux_cmdline: str  # kernel arguments a Linux guest needs on this accelerator ("" for none)

    def setup_platform(self) -> None: ...

    def map_memory(self, memory: GuestMemory) -> None: ...

    def connect_buses(self, pio_bus: Bus, mmio_bus: Bus) -> None: ...

    def irq_line(self, gsi: int) -> IrqLine: ...

    def msi_vector(self) -> MsiVector: ...

    def add_ioeventfd(self, address: int, length: int, *, pio: bool = False,
                      datamatch: int | None = None, eventfd: int | None = None) -> int | None: ...

    def remove_ioeventfd(self, fd: int, address: int, length: int, *, pio: bool = False,
                         datamatch: int | None = None) -> None: ...

    def create_vcpu(self, index: int, count: int, policy: CpuidPolicy) -> Vcpu: ...

    def remove_vcpu(self, vcpu: Vcpu) -> None:
        """Take the highest-numbered vCPU out of the machine (CPU hotplug, the VM paused): it
        never runs again unless create_vcpu() plugs its index in again."""

    def run_loops(self, vm: VmServices) -> list[RunLoop]:
        """The threads' bodies that run every vCPU until `vm.stop_requested` is set."""

    def guest_clock_ns(self) -> int:
        """The guest's clock in ns (kvm-clock on KVM, the platform clock on the software CPU):
        what freeze_time() stops."""

    def freeze_time(self) -> None:
        """The VM is paused (every run loop parked): guest time stops."""

    def thaw_time(self) -> None:
        """The VM resumes: guest time continues from where it stood."""

    def serve_device_work(self, work: Callable[[], bool], after: Callable[[], object]) -> bool:
        """From a device register's handler, on the thread whose guest write reached it (a
        queue kick): run `work()` right there if this accelerator can, and return its result
        (False: `work` did nothing, its device was busy), then call `after()` once the guest
        code running now stops (the software CPU's slice), to send what `work` held back (its
        interrupts; `slice_ended_at_hlt` says meanwhile whether that code stopped at a HLT);
        False, running neither, where it cannot: the caller hands the work to the I/O thread
        (inline_kicks.py)."""

    slice_ended_at_hlt: bool

    def end_running_slice(self) -> None:
        """After serve_device_work() served: stop the guest code running on this thread where
        its block ends, so `after()` comes at once (the software CPU's slice timer's stop)."""

    # Whether the I/O thread must not preempt the guest when a kick wakes it (IoThread `yields`):
    # true where one host thread runs the guest and wakes the I/O thread itself (the software CPU).
    io_thread_yields: bool

    # Whether the VM's threads run best on one host CPU (host/cpu_affinity.py): true where they
    # take turns on the GIL for every guest event (the software CPU), not where vCPUs run guest
    # code in the kernel.
    threads_share_one_host_cpu: bool

    # Whether start_dirty_log() logs every page the guest's vCPUs write by itself (KVM's dirty
    # log), so that a host without write-protection tracking still tracks a guest here.
    logs_guest_writes: bool

    def start_dirty_log(self) -> None:
        """Start logging the guest pages the vCPUs write where this process's mapping of guest
        RAM does not see them (KVM's dirty log); nothing where the vCPUs write through that
        mapping (the software CPU), which the Vm's HostWriteTracker already watches."""

    def collect_dirty_log(self, into: DirtyBitmap) -> None:
        """OR the pages logged since start or the previous collect into `into`; start over."""

    def stop_dirty_log(self) -> None: ...

    def save(self) -> State:
        """The VM-wide state outside the vCPUs (KVM's in-kernel irqchip, PIT and clock; the
        software CPU's platform), taken while paused."""

    def restore(self, state: State) -> None: ...

    def guest_view(self) -> GuestCpuView:
        """What the guest saw of its CPU: vCPU 0's CPUID, the TSC rate, the LAPIC timer's clock."""

    def offered_cpuid(self, policy: CpuidPolicy, count: int) -> list[CpuidEntry]:
        """The CPUID this accelerator would give vCPU 0 of a new `count`-vCPU machine."""

    def keep_guest_view(self, view: GuestCpuView) -> None:
        """Before the machine is built: show the guest `view` (a state saved on another
        accelerator), or raise a StateError naming what cannot be kept."""

    def close(self) -> None: ...
