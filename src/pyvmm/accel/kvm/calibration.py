"""How fast this host's KVM runs guest code: the calibration `--accel auto` and
`pyvmm kvm-info` rely on.

The calibration boots a tiny guest that times a loop in kernel mode (CPL0) and the same
loop in user mode (CPL3). On a host with VT-x/AMD-V both run natively; on a nested or
software-assisted KVM (like kvm_pvm) kernel code is emulated and runs thousands of times
slower, which makes Linux guests impractically slow. The guest runs on a bare KVM
accelerator (memory, buses, one vCPU and its run loop), without a Vm or the builder, so
that choosing an accelerator never depends on the layers above it.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass

from ...arch.x86_64 import layout
from ...arch.x86_64.cpuid import CpuidPolicy
from ...bus import MmioBus, PioBus
from ...errors import PyvmmError
from ...loader import load_kernel
from ...loader.entry import boot_state
from ...memory import GuestMemory
from .accelerator import KvmAccelerator

KERNEL_ITERATIONS = 20_000
USER_ITERATIONS = 20_000_000
INSTRUCTIONS_PER_ITERATION = 2  # dec + jnz
# Kernel code slower than user code by more than this means it is emulated, not run natively.
EMULATION_THRESHOLD = 20.0


@dataclass(frozen=True)
class Calibration:
    kernel_seconds: float
    user_seconds: float
    kernel_iterations: int = KERNEL_ITERATIONS
    user_iterations: int = USER_ITERATIONS

    @property
    def kernel_mips(self) -> float:
        return self.kernel_iterations * INSTRUCTIONS_PER_ITERATION / self.kernel_seconds / 1e6

    @property
    def user_mips(self) -> float:
        return self.user_iterations * INSTRUCTIONS_PER_ITERATION / self.user_seconds / 1e6

    @property
    def slowdown(self) -> float:
        """How many times slower kernel-mode code runs than user-mode code."""
        return self.user_mips / self.kernel_mips

    @property
    def kernel_code_emulated(self) -> bool:
        return self.slowdown > EMULATION_THRESHOLD


class _Markers:
    """Timestamps each phase marker the calibration guest writes; the last one ends the VM."""

    LAST = 4

    def __init__(self, on_last) -> None:
        self.marks: dict[int, float] = {}
        self._on_last = on_last

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        marker = int.from_bytes(data, "little")
        self.marks[marker] = time.perf_counter()
        if marker == self.LAST:
            self._on_last()


class CalibrationError(PyvmmError, RuntimeError):
    pass


class _CalibrationRun:
    """The VmServices of the calibration's one vCPU: no pause, and any exit that would end a
    VM ends the calibration with its reason."""

    symbols: object | None = None
    pause_requested = False

    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.failure = ""

    def pause_point(self) -> None:
        pass

    def unplugged_point(self, unplugged) -> None:
        pass  # the calibration VM never unplugs its vCPU

    def guest_exit(self, vcpu, exit_) -> None:
        self.failure = getattr(exit_, "message", "") or f"the guest stopped ({type(exit_).__name__})"
        self.stop_requested.set()


def calibrate(timeout: float = 60.0) -> Calibration:
    """Boot the calibration guest on KVM and time its two loops, on the calling thread (it
    must be the main thread, as for any VM: pyvmm installs its kick signal's handler)."""
    from ...guests import CALIBRATE_KERNEL_ITERS_ADDR, CALIBRATE_MMIO, build

    memory = GuestMemory.from_specs(layout.ram_regions(16 << 20))
    try:
        accel = KvmAccelerator()  # measures KVM itself, whatever auto would pick
    except BaseException:
        memory.close()
        raise
    try:
        accel.setup_platform()
        accel.map_memory(memory)
        pio, mmio = PioBus(), MmioBus()
        accel.connect_buses(pio, mmio)
        run = _CalibrationRun()
        markers = _Markers(lambda: stop())
        mmio.register(CALIBRATE_MMIO, 4, markers, "calibration")
        entry = load_kernel(memory, build("calibrate"))
        memory.write(CALIBRATE_KERNEL_ITERS_ADDR, struct.pack("<II", KERNEL_ITERATIONS, USER_ITERATIONS))
        vcpu = accel.create_vcpu(0, 1, CpuidPolicy(set()))
        vcpu.set_state(boot_state(memory, entry))
        (loop,) = accel.run_loops(run)
        vcpu.thread_ident = threading.get_ident()

        def stop() -> None:  # (a stop kicks the vCPU: its I/O loop does not look at the event)
            run.stop_requested.set()
            vcpu.kick()

        def time_up() -> None:
            run.failure = run.failure or f"no result after {timeout:g} s"
            stop()

        timer = threading.Timer(timeout, time_up)
        timer.start()
        try:
            loop.run()
        finally:
            timer.cancel()
            vcpu.thread_ident = None
    finally:
        accel.close()
        memory.close()
    if not all(m in markers.marks for m in (1, 2, 3, 4)):
        raise CalibrationError(f"the calibration guest did not finish: {run.failure or 'it stopped early'}")
    return Calibration(markers.marks[2] - markers.marks[1], markers.marks[4] - markers.marks[3])
