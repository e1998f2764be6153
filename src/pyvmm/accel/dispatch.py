"""ExitDispatcher: the one piece of code that serves every vCPU exit, on either accelerator.

Guest I/O goes to the buses; a run that ended from outside passes the VM's pause point;
anything else ends the VM through `VmServices.guest_exit`, where the Vm turns it into an
outcome. The KVM vCPU threads call it for each exit KVM_RUN returns; the software CPU
calls it from its I/O hooks and for the exits that end a slice for good. This is per-exit
hot code on KVM: one type switch, no extra frames.
"""

from __future__ import annotations

from ..bus.bus import Bus
from .base import Vcpu, VmServices
from .exits import Hlt, Interrupted, IoIn, IoOut, IrqWindowOpen, MmioRead, MmioWrite, VcpuExit


class ExitDispatcher:
    __slots__ = ("pio_bus", "mmio_bus", "vm")

    def __init__(self, pio_bus: Bus, mmio_bus: Bus, vm: VmServices | None = None) -> None:
        self.pio_bus, self.mmio_bus = pio_bus, mmio_bus
        self.vm = vm  # bound when the VM starts; a bare engine (tests) serves I/O only

    def __call__(self, vcpu: Vcpu, exit_: VcpuExit) -> None:
        # `type(exit_) is X` per branch, not isinstance: exact classes, and mypy narrows on it
        if type(exit_) is IoOut:
            pio, size = self.pio_bus, exit_.size
            if exit_.count == 1:
                pio.write(exit_.port, exit_.data)
            else:
                data = exit_.data
                for i in range(0, len(data), size):
                    pio.write(exit_.port, data[i:i + size])
        elif type(exit_) is IoIn:
            pio = self.pio_bus
            if exit_.count == 1:
                exit_.complete(pio.read(exit_.port, exit_.size))
            else:
                exit_.complete(b"".join(pio.read(exit_.port, exit_.size) for _ in range(exit_.count)))
        elif type(exit_) is MmioWrite:
            self.mmio_bus.write(exit_.address, exit_.data)
        elif type(exit_) is MmioRead:
            exit_.complete(self.mmio_bus.read(exit_.address, exit_.size))
        elif type(exit_) is Interrupted:
            self._vm().pause_point()
        elif type(exit_) is Hlt or type(exit_) is IrqWindowOpen:
            return  # only without an in-kernel irqchip: nothing to do but enter the guest again
        else:
            self._vm().guest_exit(vcpu, exit_)

    def _vm(self) -> VmServices:
        if self.vm is None:
            raise RuntimeError("this exit needs the VM, and the dispatcher is not bound to one")
        return self.vm
