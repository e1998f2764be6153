"""Vm: a machine's lifecycle and the policy for how it ends.

The accelerator runs the guest: it hands the Vm its run loops (accel/base.py), one thread
each, and serves every exit through the shared dispatcher. The Vm starts those threads,
offers them `VmServices` (the stop event, the pause point, `guest_exit` for exits that end
the VM) and decides outcomes. Anything that ends the VM — the guest (power off, debug
exit, triple fault), a device model that raised, a timeout, the user — goes through
`request_stop`, which records the first outcome, kicks every vCPU out of the guest and
wakes whoever waits. `pause()` is a barrier (see its docstring). `close()` joins the
threads, so nothing outlives the VM.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from .accel.base import Accelerator, RunLoop, Vcpu
from .accel.exits import DebugExit, EmulationError, Shutdown, SystemEvent, UnknownExit, VcpuExit
from . import start_up
from .errors import UserError
from .host.cpu_affinity import place_calling_thread, shared_cpu

if TYPE_CHECKING:
    from .config import MachineConfig
    from .devmgr import DeviceManager
    from .loader.linux.symbols import LazySymbolTable
    from .memory.dirty import DeviceWriteLog, DirtyBitmap, DirtyRate, HostWriteTracker

log = logging.getLogger(__name__)
# pyvmm's own exit statuses are even; debug-exit statuses, (V << 1) | 1, are odd.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_GUEST_CRASH = 4
EXIT_VMM_ERROR = 6
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

# Signals the main thread handles; vCPU threads block them so they never absorb them.
_HOST_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGWINCH}


@dataclass(frozen=True)
class VmOutcome:
    """Why a VM stopped, and the exit status pyvmm reports for it."""

    reason: str  # poweroff | reset | debug-exit | panic | triple-fault | guest-error | vmm-error | timeout | quit | interrupted
    status: int
    message: str

    @property
    def is_error(self) -> bool:
        return self.reason in ("panic", "triple-fault", "guest-error", "vmm-error", "timeout")


class VmNotPaused(UserError):
    """An operation that needs a paused VM (save) was asked of a running or stopped one."""


class VmError(UserError):
    """An operation the VM cannot do in its current state or configuration."""


class Pausable(Protocol):
    """A host-side part of the VM that must hold still while it is paused (the I/O thread,
    a device's timer): pause() returns once it touches neither the guest nor its memory."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Vm:
    def __init__(self, accel: Accelerator, memory, pio_bus, mmio_bus, vcpus: list[Vcpu], devices: dict[str, object], *,
                 iothread=None, pausables: Iterable[Pausable] = (), on_close=()) -> None:
        self.accel = accel
        self.memory = memory
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.vcpus = vcpus
        self.devices = devices
        self.outcome: VmOutcome | None = None
        self.stop_requested = threading.Event()  # VmServices: the run loops end when set
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # pause, resume, park, stop, a loop ended
        self._threads: list[threading.Thread] = []
        # Each run loop's label -> its thread's kernel id (/proc/self/task/ID), for vCPU time.
        self.run_loop_threads: dict[str, int] = {}
        # Called in each run-loop thread before it runs (e.g. pinning it to a host NUMA node's CPUs).
        self.run_loop_hooks: list[Callable[[RunLoop], None]] = []
        self._paused = False      # pause() was asked and resume() not yet
        self._parked = 0          # run loops waiting at their pause point
        self._running = 0         # run loops whose threads have not ended
        self._closed = False
        self._host_cpu: int | None = None  # where the VM's threads run (host/cpu_affinity.py), None: anywhere
        self.iothread = iothread
        # Held still while paused, after the vCPUs and in this order (the I/O thread first).
        self._pausables: list[Pausable] = ([iothread] if iothread is not None else []) + list(pausables)
        self._on_close = list(on_close)  # released after every thread stopped, in order
        # The guest kernel's symbols (loader.linux.symbols), named in errors at a guest RIP.
        self.symbols: LazySymbolTable | None = None
        # The device tree and what it allocated (devmgr.DeviceManager), and the machine
        # description (config.MachineConfig) it was built from; the builder sets both.
        self.device_manager: DeviceManager | None = None
        self.machine: MachineConfig | None = None
        self.assembly: Any = None   # builder.Machine: its parts, which hotplug.py changes
        self._owns_memory = True
        # Dirty-page tracking: one tracking, each reader's pages since its previous dirty_log().
        self._dirty_lock = threading.Lock()
        self._dirty_tracker: HostWriteTracker | DeviceWriteLog | None = None
        self._dirty_readers: dict[str, DirtyBitmap] = {}
        self._dirty_rate: DirtyRate | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        from . import seccomp

        self._host_cpu = shared_cpu() if self.accel.threads_share_one_host_cpu else None  # (may refuse the setting)
        start_up.vm_starting()
        # Set-up is over: the process filter goes in before the VM's threads exist, each of
        # which stacks its own kind's filter first thing (seccomp/__init__.py: why this order).
        seccomp.install_process_filter(spawn=self._runs_helpers())
        if self.iothread is not None:
            def io_thread_init() -> None:
                place_calling_thread(self._host_cpu)
                seccomp.enter_thread("io", "vmm-io")

            self.iothread.thread_init = io_thread_init
            self.iothread.start()
        loops = self.accel.run_loops(self)
        self._running = len(loops)
        for loop in loops:
            self._threads.append(threading.Thread(target=self._thread_main, args=(loop,), name=loop.name, daemon=True))
        for thread in self._threads:
            thread.start()

    def start_run_loop(self, loop: RunLoop) -> None:
        """Run `loop` in a thread of its own from now on (a vCPU plugged into the running VM on
        an accelerator with a thread per vCPU); paused, it parks like the others."""
        with self._lock:
            self._running += 1
        thread = threading.Thread(target=self._thread_main, args=(loop,), name=loop.name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def wait(self, timeout: float | None = None) -> VmOutcome | None:
        """Block until the VM stops (or `timeout` passes: then None)."""
        self.stop_requested.wait(timeout)
        return self.outcome

    def run(self, timeout: float | None = None) -> VmOutcome:
        """Start, wait for the end (or stop it after `timeout` seconds), clean up."""
        self.start()
        try:
            if self.wait(timeout) is None:
                self.request_stop(VmOutcome("timeout", EXIT_TIMEOUT, "the guest was still running when the time limit (--timeout) expired"))
        except KeyboardInterrupt:
            self.request_stop(VmOutcome("interrupted", EXIT_INTERRUPTED, "interrupted"))
        finally:
            self.close()
        assert self.outcome is not None  # the VM stopped: whoever stopped it set the outcome
        return self.outcome

    def request_stop(self, outcome: VmOutcome) -> None:
        """Stop the VM with `outcome` (the first request wins). Safe from any thread."""
        with self._lock:
            if self.outcome is None:
                self.outcome = outcome
                log.debug("stopping: %s", outcome)
            self.stop_requested.set()
            self._changed.notify_all()
        for vcpu in self.vcpus:
            vcpu.kick()

    def press_power_button(self) -> None:
        """Press the ACPI power button: a request, not an order. The guest's button driver sees
        it (arch/x86_64/ged.py) and its userspace decides; the default guest powers off cleanly,
        ending the VM with outcome "poweroff". Callers wanting a graceful stop wait() for it
        with a timeout of their choosing. Safe from any thread."""
        button = self.devices.get("ged")
        if button is None:
            raise VmError("this machine has no ACPI power button")
        if self.stop_requested.is_set():
            raise VmError("the VM has stopped: there is no guest to press the power button of")
        button.press_power_button()  # type: ignore[attr-defined]

    @property
    def stopped(self) -> bool:
        return self.stop_requested.is_set()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def running_threads(self) -> int:
        """Run-loop threads that have not ended."""
        return self._running

    @property
    def parked_threads(self) -> int:
        """Run-loop threads waiting at their pause point (all of them once pause() returned)."""
        return self._parked

    def pause(self) -> None:
        """A barrier: when this returns, no vCPU is in the guest (every run loop has parked at
        its pause point, on both accelerators), the I/O thread has finished the work item it
        was in and waits, device timers hold their interrupts, and guest time stands still
        (the accelerator's freeze_time). A VM that stops meanwhile ends the wait."""
        if threading.current_thread() in self._threads:
            raise RuntimeError("pause() from a run-loop thread would wait for itself")
        with self._lock:
            if self._paused or self.stop_requested.is_set():
                return
            self._paused = True
        for vcpu in self.vcpus:
            vcpu.kick()
        with self._lock:
            while self._parked < self._running and not self.stop_requested.is_set():
                self._changed.wait()
        for part in self._pausables:
            part.pause()
        self.accel.freeze_time()

    def resume(self) -> None:
        """Undo pause(), in reverse order: guest time runs on from where it stood."""
        with self._lock:
            if not self._paused:
                return
        self.accel.thaw_time()
        for part in reversed(self._pausables):
            part.resume()
        with self._lock:
            self._paused = False
            for vcpu in self.vcpus:
                vcpu.clear_kick()
            self._changed.notify_all()

    # --- VmServices: what the run loops ask while they run ----------------------------------

    @property
    def pause_requested(self) -> bool:
        return self._paused

    def pause_point(self) -> None:
        """Between guest runs: park here while the VM is paused (pause() waits for every loop)."""
        if not self._paused:
            return
        with self._lock:
            if not self._paused:
                return
            self._parked += 1
            self._changed.notify_all()
            try:
                while self._paused and not self.stop_requested.is_set():
                    self._changed.wait()
            finally:
                self._parked -= 1

    def unplugged_point(self, unplugged: Callable[[], bool]) -> None:
        """VmServices: a vCPU unplugged from the running VM parks its thread here until it is
        plugged again (wake_unplugged) or the VM stops; pause() does not wait for it meanwhile."""
        with self._lock:
            self._running -= 1
            self._changed.notify_all()
            try:
                while unplugged() and not self.stop_requested.is_set():
                    self._changed.wait()
            finally:
                self._running += 1

    def wake_unplugged(self) -> None:
        """A vCPU whose thread waits at unplugged_point() was plugged in again."""
        with self._lock:
            self._changed.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        if not self.stop_requested.is_set():
            self.request_stop(VmOutcome("quit", EXIT_OK, "stopped by the VMM"))
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join()
        self._closed = True
        if self.iothread is not None:
            self.iothread.stop()
        self._end_dirty_tracking()
        for release in self._on_close:
            try:
                release()
            except Exception:  # one device failing to close must not leak the others
                log.warning("closing the VM: %s failed", getattr(release, "__qualname__", release), exc_info=True)
        self.accel.close()
        if self._owns_memory:
            self.memory.close()

    # --- state -------------------------------------------------------------------------------

    def save(self):
        """The whole state of this paused VM but guest memory (vm_state.VmState); a VM that is
        running or has stopped is refused with one line."""
        from .vm_state import capture

        with self._lock:
            if not self._paused or self.stop_requested.is_set():
                raise VmNotPaused("the VM must be paused to save its state (pause() first)"
                                  if not self.stop_requested.is_set() else "the VM has stopped: nothing to save")
        return capture(self)

    def release_memory(self):
        """Hand guest memory to another owner (a VM restored from this one's state): close()
        leaves it mapped and open."""
        self._owns_memory = False
        return self.memory

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- dirty-page tracking -------------------------------------------------------------

    def start_dirty_log(self, reader: str = "default") -> None:
        """Log the guest pages written from now on, by anything: guest code on either
        accelerator, device emulation on any thread. Readers (a series of Diff snapshots,
        a migration) each get their own log of one tracking; starting a reader that is
        already logging keeps its log. DirtyTrackingUnavailable (one line) where the host or
        this machine cannot track: a vhost-user back-end writes guest RAM from another
        process, which nothing here sees."""
        from .memory.dirty import DeviceWriteLog, DirtyBitmap, DirtyRate, DirtyTrackingUnavailable, HostWriteTracker

        with self._dirty_lock:
            if self._closed or self.stop_requested.is_set():
                raise VmError("the VM has stopped: there is nothing to track")
            if reader in self._dirty_readers:
                return
            if self._dirty_tracker is None:
                for node in (self.device_manager.tree if self.device_manager is not None else ()):
                    if node.kind.startswith("vhost-user"):
                        raise DirtyTrackingUnavailable(
                            f"cannot track dirty pages: {node.id}'s vhost-user back-end writes guest RAM from another process")
                # RAM still loading lazily (a uffd restore) is registered on another
                # userfaultfd, which tracking cannot share: finish loading first.
                self.memory.populate()
                tracker: HostWriteTracker | DeviceWriteLog
                try:
                    tracker = HostWriteTracker(self.memory)
                except DirtyTrackingUnavailable:
                    if not self.accel.logs_guest_writes:
                        raise
                    tracker = DeviceWriteLog(self.memory, self._used_rings)  # the guest's writes: KVM's log
                try:
                    self.accel.start_dirty_log()
                except BaseException:
                    tracker.close()
                    raise
                self._dirty_tracker = tracker
                self._dirty_rate = DirtyRate()
                self._dirty_rate.start()
            else:
                self._collect_dirty_locked()  # what was written until now is the other readers'
            self._dirty_readers[reader] = DirtyBitmap.empty(self.memory)

    def dirty_log(self, reader: str = "default") -> DirtyBitmap:
        """The pages written since start_dirty_log() or this reader's previous dirty_log()
        (running or paused); the reader's log starts over."""
        from .memory.dirty import DirtyBitmap

        with self._dirty_lock:
            if reader not in self._dirty_readers:
                raise VmError("the dirty log is not running (start_dirty_log() first)")
            self._collect_dirty_locked()
            taken = self._dirty_readers[reader]
            self._dirty_readers[reader] = DirtyBitmap.empty(self.memory)
            return taken

    def _used_rings(self) -> list[tuple[int, int]]:
        """(address, length) of every ready virtqueue's used ring: guest RAM devices write."""
        rings = []
        for device in self.devices.values():
            for queue in getattr(device, "queues", ()):
                if queue.ready:
                    rings.append((queue.used_ring, 6 + 8 * queue.size))
        return rings

    def _collect_dirty_locked(self) -> None:
        """The pages written since the previous collection, from the host and the accelerator,
        into every reader's log."""
        assert self._dirty_tracker is not None and self._dirty_rate is not None
        fresh = self._dirty_tracker.collect()
        self.accel.collect_dirty_log(fresh)
        self._dirty_rate.add(fresh.count())
        for bitmap in self._dirty_readers.values():
            bitmap.merge(fresh)

    def dirty_rate(self) -> float | None:
        """Pages dirtied per second over the last few seconds of dirty_log() calls (any
        reader), or None before two of them: pre-copy's convergence estimate."""
        with self._dirty_lock:
            return self._dirty_rate.pages_per_second() if self._dirty_rate is not None else None

    @property
    def dirty_logging(self) -> bool:
        return self._dirty_tracker is not None

    def stop_dirty_log(self, reader: str = "default") -> None:
        """This reader stops logging; the tracking itself (and its cost to the guest) ends
        with the last reader."""
        with self._dirty_lock:
            self._dirty_readers.pop(reader, None)
            if self._dirty_readers:
                return
        self._end_dirty_tracking()

    def _end_dirty_tracking(self) -> None:
        with self._dirty_lock:
            self._dirty_readers.clear()
            tracker, self._dirty_tracker = self._dirty_tracker, None
            self._dirty_rate = None
            if tracker is None:
                return
            tracker.close()
            try:
                self.accel.stop_dirty_log()
            except Exception:  # the VM is ending or its memory slots are gone: nothing is logged then
                log.debug("stopping the accelerator's dirty log failed", exc_info=True)

    # --- metrics ------------------------------------------------------------------------

    def exit_counts(self) -> dict[str, int]:
        """VM exits by reason, summed over vCPUs (what kvm_stat shows per VM)."""
        total: dict[str, int] = {}
        for vcpu in self.vcpus:
            for reason, count in vcpu.exit_counts.items():
                total[reason] = total.get(reason, 0) + count
        return total

    # --- the run-loop threads ----------------------------------------------------------------

    def _runs_helpers(self) -> bool:
        """Whether this machine starts helper programs after set-up: a tap=auto NIC makes and
        removes its network namespace with `ip` (net/netns.py), unless a jailer made it (net/handed.py)."""
        if self.machine is None or not any(net.tap == "auto" for net in self.machine.nets):
            return False  # (before importing the networking modules a machine without NICs does not need)
        from .net.handed import handed_taps

        return handed_taps() is None

    def _thread_main(self, loop: RunLoop) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HOST_SIGNALS)
        from . import seccomp

        place_calling_thread(self._host_cpu)
        seccomp.enter_thread(loop.seccomp_kind, f"vmm-{loop.name}")
        for vcpu in loop.vcpus:
            vcpu.thread_ident = threading.get_ident()
        self.run_loop_threads[loop.label] = threading.get_native_id()
        try:
            for hook in self.run_loop_hooks:
                hook(loop)
            loop.run()
        except BaseException as exc:  # a device model (or pyvmm) failed: stop the VM, say why
            log.debug("%s failed", loop.label, exc_info=True)
            self.request_stop(VmOutcome("vmm-error", EXIT_VMM_ERROR, f"{loop.label}: {type(exc).__name__}: {exc}"))
        finally:
            for vcpu in loop.vcpus:
                vcpu.thread_ident = None
            with self._lock:
                self._running -= 1
                self._changed.notify_all()

    def guest_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> None:
        """VmServices: an exit that ends the VM, turned into its outcome."""
        if isinstance(exit_, Shutdown):
            self.request_stop(VmOutcome(
                "triple-fault", EXIT_GUEST_CRASH,
                f"guest triple fault on vCPU {vcpu.index} at {vcpu.describe_position()}: the CPU shut down"))
        elif isinstance(exit_, EmulationError):
            self.request_stop(VmOutcome("guest-error", EXIT_GUEST_CRASH, f"vCPU {vcpu.index}: {exit_.message}"))
        elif isinstance(exit_, SystemEvent):
            if exit_.kind == SystemEvent.RESET:
                self.request_stop(VmOutcome("reset", EXIT_OK, "the guest reset the machine"))
            elif exit_.kind == SystemEvent.POWEROFF:
                self.request_stop(VmOutcome("poweroff", EXIT_OK, "the guest powered off"))
            else:
                self.request_stop(VmOutcome("guest-error", EXIT_GUEST_CRASH, f"the guest crashed ({exit_.detail})"))
        elif isinstance(exit_, DebugExit):
            self.request_stop(VmOutcome("guest-error", EXIT_GUEST_CRASH, f"vCPU {vcpu.index}: unexpected debug exit at {exit_.pc:#x}"))
        elif isinstance(exit_, UnknownExit):
            self.request_stop(VmOutcome("vmm-error", EXIT_VMM_ERROR, f"vCPU {vcpu.index}: unhandled exit reason {exit_.reason}"))
        else:
            self.request_stop(VmOutcome("vmm-error", EXIT_VMM_ERROR, f"vCPU {vcpu.index}: unhandled exit {type(exit_).__name__}"))
