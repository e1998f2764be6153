"""An ISA test device for I/O-port and interrupt tests, as QEMU's `pc-testdev` offers them to
test kernels (kvm-unit-tests). pyvmm offers it with `--test-devices` (a definition's
`pyvmm.test_devices`), at the same ports:

    0xe0-0xe3    a 32-bit latch: a write of any width at any offset replaces those bytes of it,
                 a read returns them (port I/O round trips, partial and unaligned accesses)
    0xe4-0xe7    "flush page" (QEMU write-protects a guest page for a moment, to test KVM's
                 MMU notifiers): accepted and ignored, pyvmm has nothing to flush
    0xe8-0xeb    the same latch again (QEMU splits accesses there into single bytes: the
                 outcome is the same)
    0x2000+N     one byte per ISA IRQ N (0-15): a non-zero write raises the line, zero lowers
                 it (level). IRQ 0 and 2 are not offered (the PIT's input and the PIC cascade);
                 writes there are ignored. A line shared with a device (COM1's IRQ 4) follows
                 the last writer, as on QEMU's ISA bus.

QEMU's 64 KiB scratch MMIO window at 0xff000000 is not offered. Ending the VM with a status
of the guest's choice is the debug-exit device (port 0xf4, always present).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ...bus.interrupt import IrqLine
from ...persist import State

LATCH_PORT, FLUSH_PORT, LATCH_BYTES_PORT, IRQ_PORT = 0xE0, 0xE4, 0xE8, 0x2000
WINDOW = 4                           # each of the three windows at 0xe0
IRQ_PORT_COUNT = 16
UNOFFERED_IRQS = (0, 2)


class TestDevice:
    """The latch and the IRQ lines. `lines` maps an ISA IRQ to its line (IRQ_PORT + IRQ)."""

    __test__ = False                  # not a pytest test class, despite the name

    def __init__(self, lines: dict[int, IrqLine]) -> None:
        self._lines = dict(lines)
        self._lock = threading.Lock()
        self.latch = 0
        self.raised: set[int] = set()

    # the three 4-port windows at 0xe0 (offsets 0-11 from LATCH_PORT)
    def read(self, offset: int, size: int) -> bytes:
        if offset // WINDOW == 1:     # flush page: write-only
            return b"\xff" * size
        start = offset % WINDOW
        with self._lock:
            data = self.latch.to_bytes(WINDOW, "little")
        return data[start:start + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        if offset // WINDOW == 1:
            return
        start = offset % WINDOW
        with self._lock:
            latch = bytearray(self.latch.to_bytes(WINDOW, "little"))
            part = data[:WINDOW - start]
            latch[start:start + len(part)] = part
            self.latch = int.from_bytes(latch, "little")

    def set_irq(self, irq: int, high: bool) -> None:
        line = self._lines.get(irq)
        if line is None:
            return
        with self._lock:
            (self.raised.add if high else self.raised.discard)(irq)
        line.set_level(high)

    def save(self) -> TestDeviceState:
        with self._lock:
            return TestDeviceState(latch=self.latch, raised=tuple(sorted(self.raised)))

    def restore(self, state: TestDeviceState) -> None:
        """The latch, and the lines this device held raised (raised again: the interrupt
        controllers' own state was restored with them already)."""
        with self._lock:
            self.latch = state.latch
            self.raised = {irq for irq in state.raised if irq in self._lines}
            raised = sorted(self.raised)
        for irq in raised:
            self._lines[irq].set_level(True)


class TestDeviceIrqPorts:
    """The IRQ window: IRQ_PORT + N (one byte each) drives ISA IRQ N."""

    __test__ = False

    def __init__(self, device: TestDevice) -> None:
        self.device = device

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.device.set_irq(offset, any(data))


@dataclass(frozen=True)
class TestDeviceState(State):
    KIND = "test_device"
    __test__ = False
    latch: int
    raised: tuple[int, ...]

    def validate(self) -> None:
        self.check_range("latch", 0, 0xFFFF_FFFF)
        self.check_items("raised", 0, IRQ_PORT_COUNT - 1)
