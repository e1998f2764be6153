"""Vm: owns guest memory, the buses, the devices and the vCPU threads.

One thread per vCPU runs the loop below: enter the guest, match the exit,
dispatch it to a bus. Anything that ends the VM — the guest (power off, debug
exit, triple fault), a device model that raised, a timeout, the user — goes
through `request_stop`, which records the first outcome, kicks every vCPU out
of the guest and wakes whoever waits. `close()` joins the threads, so nothing
outlives the VM.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

from .kvm.exits import (
    DebugExit, EmulationError, FailEntry, Hlt, InternalError, Interrupted, IoIn, IoOut, IrqWindowOpen,
    MmioRead, MmioWrite, Shutdown, SystemEvent, UnknownExit,
)
from .kvm import uapi

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


class Vm:
    def __init__(self, accel, memory, pio_bus, mmio_bus, vcpus, devices: dict[str, object], *,
                 iothread=None, on_close=()) -> None:
        self.accel = accel
        self.memory = memory
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.vcpus = vcpus
        self.devices = devices
        self.outcome: VmOutcome | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._paused = False
        self._resume = threading.Condition(self._lock)
        self._closed = False
        self.iothread = iothread
        self._on_close = list(on_close)  # released after every thread stopped, in order
        # The guest kernel's symbols (loader.linux.symbols), named in errors at a guest RIP.
        self.symbols = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self.iothread is not None:
            self.iothread.start()
        if getattr(self.accel, "per_vcpu_threads", True):
            for vcpu in self.vcpus:
                self._threads.append(threading.Thread(
                    target=self._thread_main, args=(f"vCPU {vcpu.index}", self._vcpu_loop, vcpu),
                    name=f"vcpu{vcpu.index}", daemon=True))
        else:  # the accelerator schedules all vCPUs itself (the software CPU)
            self._threads.append(threading.Thread(
                target=self._thread_main, args=(self.accel.name, self.accel.run, self),
                name=f"vcpus-{self.accel.name}", daemon=True))
        for thread in self._threads:
            thread.start()

    def wait(self, timeout: float | None = None) -> VmOutcome | None:
        """Block until the VM stops (or `timeout` passes: then None)."""
        self._stopped.wait(timeout)
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
        return self.outcome

    def request_stop(self, outcome: VmOutcome) -> None:
        """Stop the VM with `outcome` (the first request wins). Safe from any thread."""
        with self._lock:
            if self.outcome is None:
                self.outcome = outcome
                log.debug("stopping: %s", outcome)
            self._paused = False
            self._resume.notify_all()
        for vcpu in self.vcpus:
            vcpu.kick()
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def pause(self) -> None:
        """Take every vCPU out of the guest and hold it until resume()."""
        with self._lock:
            self._paused = True
        for vcpu in self.vcpus:
            vcpu.kick()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            for vcpu in self.vcpus:
                vcpu.clear_kick()
            self._resume.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        if not self._stopped.is_set():
            self.request_stop(VmOutcome("quit", EXIT_OK, "stopped by the VMM"))
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join()
        self._closed = True
        if self.iothread is not None:
            self.iothread.stop()
        for release in self._on_close:
            try:
                release()
            except Exception:  # one device failing to close must not leak the others
                log.warning("closing the VM: %s failed", getattr(release, "__qualname__", release), exc_info=True)
        self.accel.close()
        self.memory.close()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- metrics ------------------------------------------------------------------------

    def exit_counts(self) -> dict[str, int]:
        """VM exits by reason, summed over vCPUs (what kvm_stat shows per VM)."""
        total: dict[str, int] = {}
        for vcpu in self.vcpus:
            for reason, count in vcpu.exit_counts.items():
                total[reason] = total.get(reason, 0) + count
        return total

    # --- the vCPU loop ---------------------------------------------------------------------

    def _thread_main(self, label: str, loop, target) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HOST_SIGNALS)
        vcpus = self.vcpus if target is self else [target]
        for vcpu in vcpus:
            vcpu.thread_ident = threading.get_ident()
        try:
            loop(target)
        except BaseException as exc:  # a device model (or pyvmm) failed: stop the VM, say why
            log.debug("%s failed", label, exc_info=True)
            self.request_stop(VmOutcome("vmm-error", EXIT_VMM_ERROR, f"{label}: {type(exc).__name__}: {exc}"))
        finally:
            for vcpu in vcpus:
                vcpu.thread_ident = None

    def _vcpu_loop(self, vcpu) -> None:
        pio, mmio, stopped = self.pio_bus, self.mmio_bus, self._stopped
        run = vcpu.run
        while not stopped.is_set():
            exit_ = run()
            kind = type(exit_)
            if kind is IoOut:
                size = exit_.size
                if exit_.count == 1:
                    pio.write(exit_.port, exit_.data)
                else:
                    data = exit_.data
                    for i in range(0, len(data), size):
                        pio.write(exit_.port, data[i:i + size])
            elif kind is IoIn:
                if exit_.count == 1:
                    exit_.complete(pio.read(exit_.port, exit_.size))
                else:
                    exit_.complete(b"".join(pio.read(exit_.port, exit_.size) for _ in range(exit_.count)))
            elif kind is MmioWrite:
                mmio.write(exit_.address, exit_.data)
            elif kind is MmioRead:
                exit_.complete(mmio.read(exit_.address, exit_.size))
            elif kind is Interrupted:
                self.wait_while_paused()
            elif kind is Hlt or kind is IrqWindowOpen:
                continue  # only without an in-kernel irqchip; nothing to do here
            else:
                self.guest_event(vcpu, exit_)

    def wait_while_paused(self) -> None:
        """Called by vCPU threads between guest runs: hold here while the VM is paused."""
        with self._lock:
            while self._paused and not self._stopped.is_set():
                self._resume.wait()

    def guest_event(self, vcpu, exit_) -> None:
        """Exits that end the VM."""
        if isinstance(exit_, Shutdown):
            self.request_stop(VmOutcome(
                "triple-fault", EXIT_GUEST_CRASH,
                f"guest triple fault on vCPU {vcpu.index} at {vcpu.describe_position()}: the CPU shut down"))
        elif isinstance(exit_, EmulationError):
            self.request_stop(VmOutcome("guest-error", EXIT_GUEST_CRASH, f"vCPU {vcpu.index}: {exit_.message}"))
        elif isinstance(exit_, InternalError):
            if vcpu.assist(exit_):
                return
            self.request_stop(VmOutcome("guest-error", EXIT_GUEST_CRASH,
                                        f"vCPU {vcpu.index}: {vcpu.describe_internal_error(exit_, self.symbols)}"))
        elif isinstance(exit_, SystemEvent):
            if exit_.type == uapi.KVM_SYSTEM_EVENT_RESET:
                self.request_stop(VmOutcome("reset", EXIT_OK, "the guest reset the machine"))
            elif exit_.type == uapi.KVM_SYSTEM_EVENT_SHUTDOWN:
                self.request_stop(VmOutcome("poweroff", EXIT_OK, "the guest powered off"))
            else:
                self.request_stop(VmOutcome("guest-error", EXIT_GUEST_CRASH, f"the guest crashed (system event {exit_.type})"))
        elif isinstance(exit_, FailEntry):
            self.request_stop(VmOutcome(
                "guest-error", EXIT_GUEST_CRASH,
                f"vCPU {vcpu.index}: the host refused to enter the guest (hardware reason {exit_.reason:#x}) at {vcpu.describe_position()}"))
        elif isinstance(exit_, DebugExit):
            self.request_stop(VmOutcome("guest-error", EXIT_GUEST_CRASH, f"vCPU {vcpu.index}: unexpected debug exit at {exit_.pc:#x}"))
        elif isinstance(exit_, UnknownExit):
            self.request_stop(VmOutcome("vmm-error", EXIT_VMM_ERROR, f"vCPU {vcpu.index}: unhandled exit reason {exit_.reason}"))
        else:
            self.request_stop(VmOutcome("vmm-error", EXIT_VMM_ERROR, f"vCPU {vcpu.index}: unhandled exit {type(exit_).__name__}"))
