"""Typed vCPU exits: what stopped the guest, decoded from kvm_run.

Plain Python objects with no fd behind them, so the software CPU backend
produces the same types and the vCPU loop is written once.
"""

from __future__ import annotations

import ctypes

from . import uapi


class VcpuExit:
    __slots__ = ()


class IoIn(VcpuExit):
    """The guest executed IN/INS: answer with `count` items of `size` bytes."""

    __slots__ = ("port", "size", "count", "_buffer", "_offset")

    def __init__(self, port: int, size: int, count: int, buffer, offset: int) -> None:
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
    __slots__ = ("address", "size", "_run")

    def __init__(self, address: int, size: int, run) -> None:
        self.address, self.size, self._run = address, size, run

    def complete(self, data: bytes) -> None:
        ctypes.memmove(self._run.exit.mmio.data, data, min(len(data), 8))


class MmioWrite(VcpuExit):
    __slots__ = ("address", "data")

    def __init__(self, address: int, data: bytes) -> None:
        self.address, self.data = address, data


class Hlt(VcpuExit):
    __slots__ = ()


class Shutdown(VcpuExit):
    """Triple fault (or another shutdown condition) in the guest."""

    __slots__ = ()


class Interrupted(VcpuExit):
    """KVM_RUN returned because of a signal or immediate_exit: nothing happened in the guest."""

    __slots__ = ()


class IrqWindowOpen(VcpuExit):
    __slots__ = ()


class InternalError(VcpuExit):
    __slots__ = ("suberror", "data")

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror, self.data = suberror, data

    def describe(self) -> str:
        kinds = {
            uapi.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
            uapi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception raised while delivering another",
            uapi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
            uapi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
        }
        return kinds.get(self.suberror, f"suberror {self.suberror}")

    @property
    def instruction_bytes(self) -> bytes:
        """The bytes KVM fetched for an emulation failure, when it reports them (data[0] bit 0,
        KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: a size byte then 15 bytes in data[1:3])."""
        if self.suberror != uapi.KVM_INTERNAL_ERROR_EMULATION or len(self.data) < 3 or not self.data[0] & 1:
            return b""
        raw = self.data[1].to_bytes(8, "little") + self.data[2].to_bytes(8, "little")
        return raw[1:1 + min(raw[0], 15)]


class FailEntry(VcpuExit):
    __slots__ = ("reason", "cpu")

    def __init__(self, reason: int, cpu: int) -> None:
        self.reason, self.cpu = reason, cpu


class SystemEvent(VcpuExit):
    __slots__ = ("type", "data")

    def __init__(self, type_: int, data: tuple[int, ...]) -> None:
        self.type, self.data = type_, data


class DebugExit(VcpuExit):
    __slots__ = ("exception", "pc")

    def __init__(self, exception: int, pc: int) -> None:
        self.exception, self.pc = exception, pc


class UnknownExit(VcpuExit):
    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason


_INTERRUPTED = Interrupted()
_HLT = Hlt()
_SHUTDOWN = Shutdown()
_IRQ_WINDOW = IrqWindowOpen()


class EmulationError(VcpuExit):
    """The software CPU could not go on (e.g. the guest fetched code outside RAM)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message
