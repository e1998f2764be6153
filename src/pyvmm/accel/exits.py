"""Typed vCPU exits, the same for every accelerator: what stopped the guest.

Plain Python objects with no fd behind them. The KVM accelerator decodes its kvm_run page
into them, the software CPU builds them in its hooks, and both hand them to one
`ExitDispatcher` (dispatch.py). What is backend-specific (KVM's internal-error
suberrors, its system-event codes) is translated before an exit gets here.
"""

from __future__ import annotations

import mmap

# Where an IN or MMIO read's answer is written: the kvm_run page, or a small bytearray.
AnswerBuffer = bytearray | mmap.mmap


class VcpuExit:
    __slots__ = ()


class IoIn(VcpuExit):
    """The guest executed IN/INS: answer with `count` items of `size` bytes, written into
    `buffer` at `offset` (the kvm_run page on KVM, a small bytearray on the software CPU)."""

    __slots__ = ("port", "size", "count", "_buffer", "_offset")

    def __init__(self, port: int, size: int, count: int, buffer: AnswerBuffer, offset: int = 0) -> None:
        self.port, self.size, self.count = port, size, count
        self._buffer, self._offset = buffer, offset

    def complete(self, data: bytes) -> None:
        self._buffer[self._offset:self._offset + len(data)] = data


class IoOut(VcpuExit):
    """The guest executed OUT/OUTS: `data` holds `count` items of `size` bytes."""

    __slots__ = ("port", "size", "count", "data")

    def __init__(self, port: int, size: int, count: int, data: bytes) -> None:
        self.port, self.size, self.count, self.data = port, size, count, data


class MmioRead(VcpuExit):
    """A guest load from an address that is not RAM: answer with `size` bytes, written into
    `buffer` at `offset`."""

    __slots__ = ("address", "size", "_buffer", "_offset")

    def __init__(self, address: int, size: int, buffer: AnswerBuffer, offset: int = 0) -> None:
        self.address, self.size = address, size
        self._buffer, self._offset = buffer, offset

    def complete(self, data: bytes) -> None:
        data = data[:8]
        self._buffer[self._offset:self._offset + len(data)] = data


class MmioWrite(VcpuExit):
    __slots__ = ("address", "data")

    def __init__(self, address: int, data: bytes) -> None:
        self.address, self.data = address, data


class Hlt(VcpuExit):
    """The vCPU halted (only seen when no in-kernel irqchip wakes it)."""

    __slots__ = ()


class Interrupted(VcpuExit):
    """The guest run ended from outside (a kick, a signal, the end of a time slice):
    nothing happened in the guest. The vCPU thread passes its pause point next."""

    __slots__ = ()


class IrqWindowOpen(VcpuExit):
    __slots__ = ()


# --- exits that end the VM -------------------------------------------------------------------


class Shutdown(VcpuExit):
    """Triple fault (or another shutdown condition) in the guest."""

    __slots__ = ()


class SystemEvent(VcpuExit):
    """The platform asked to reset or power off, or reported a crash."""

    RESET, POWEROFF, CRASH = "reset", "poweroff", "crash"
    __slots__ = ("kind", "detail")

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind, self.detail = kind, detail


class EmulationError(VcpuExit):
    """The vCPU cannot go on: an instruction neither the CPU nor pyvmm could complete, a
    refused guest entry, code fetched outside RAM. `message` is one line for the user."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class DebugExit(VcpuExit):
    __slots__ = ("exception", "pc")

    def __init__(self, exception: int, pc: int) -> None:
        self.exception, self.pc = exception, pc


class UnknownExit(VcpuExit):
    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason


INTERRUPTED = Interrupted()
HLT = Hlt()
SHUTDOWN = Shutdown()
IRQ_WINDOW_OPEN = IrqWindowOpen()
