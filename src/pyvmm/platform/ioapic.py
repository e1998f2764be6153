"""82093AA-style I/O APIC: 24 input pins turned into APIC bus messages.

MMIO window (0x1000 bytes at 0xFEC00000): IOREGSEL at 0x00 selects a register, IOWIN at
0x10 reads/writes it. Registers: 0x00 ID (bits 27-24), 0x01 version (0x00170011: 24 pins,
version 0x11, so no EOI register -- EOIs arrive as LAPIC broadcasts), 0x02 arbitration ID,
0x10 + 2n / 0x11 + 2n the low/high halves of redirection entry n.

Redirection entry: vector 7-0, delivery mode 10-8, logical destination 11, delivery status 12
(always idle: messages are delivered at once), polarity 13, Remote IRR 14, level trigger 15,
mask 16, destination 63-56.

`set_irq(pin, level)` takes the *asserted* state of the input, whatever the programmed
polarity: the models above it think in asserted/deasserted, and ignoring the polarity bit
means a guest that programs it either way still works.

Edge-triggered pins send one message per rising edge; an edge while masked is lost.
Level-triggered pins send a message while asserted, unmasked and Remote IRR clear, and set
Remote IRR; the LAPIC's EOI broadcast (`end_of_interrupt(vector)`) clears it and re-sends
if the pin is still asserted. Switching a pin to edge clears Remote IRR (Linux relies on
this to unstick pins on IOAPICs without an EOI register).

Threads: `set_irq` may be called from any thread; all methods take the APIC bus lock.
"""

from __future__ import annotations

import logging
from typing import Final

from ..persist import require
from .apic_bus import ApicBus, DeliveryMode
from .ioapic_state import IoApicState

log = logging.getLogger(__name__)

IOAPIC_BASE: Final = 0xFEC00000
IOAPIC_WINDOW: Final = 0x1000
IOAPIC_PINS: Final = 24
IOAPIC_VERSION: Final = 0x11
IOREGSEL: Final = 0x00
IOWIN: Final = 0x10

REG_ID: Final = 0x00
REG_VERSION: Final = 0x01
REG_ARBITRATION: Final = 0x02
REG_REDIRECTION: Final = 0x10

RTE_VECTOR: Final = 0xFF
RTE_LOGICAL: Final = 1 << 11
RTE_DELIVERY_STATUS: Final = 1 << 12
RTE_POLARITY_LOW: Final = 1 << 13
RTE_REMOTE_IRR: Final = 1 << 14
RTE_LEVEL: Final = 1 << 15
RTE_MASKED: Final = 1 << 16
RTE_WRITABLE_LOW: Final = 0x0001AFFF  # all but delivery status and Remote IRR
RTE_WRITABLE_HIGH: Final = 0xFF000000
RTE_RESET: Final = RTE_MASKED


class IoApic:
    def __init__(self, bus: ApicBus, *, pins: int = IOAPIC_PINS, ioapic_id: int = 0) -> None:
        self._bus = bus
        self._lock = bus.lock
        self.pins = pins
        self._initial_id = ioapic_id & 0xF
        self._asserted = 0  # input pins as the devices drive them (bitmask)
        self._power_on()
        bus.attach_ioapic(self)

    def _power_on(self) -> None:
        self._id = self._initial_id
        self._select = 0
        self._redirection = [RTE_RESET] * self.pins

    # --- MMIO -------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            out = bytearray()
            position = offset
            while len(out) < size:
                dword = position & ~3
                chunk = min(size - len(out), dword + 4 - position)
                if dword == IOREGSEL:
                    value = self._select
                elif dword == IOWIN:
                    value = self._read_register(self._select)
                else:
                    value = 0
                out += value.to_bytes(4, "little")[position - dword:position - dword + chunk]
                position += chunk
            return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            position = offset
            remaining = bytes(data)
            while remaining:
                dword = position & ~3
                start = position - dword
                chunk = min(len(remaining), 4 - start)
                if dword == IOREGSEL:
                    if start == 0:
                        self._select = remaining[0]
                elif dword == IOWIN:
                    current = bytearray(self._read_register(self._select).to_bytes(4, "little"))
                    current[start:start + chunk] = remaining[:chunk]
                    self._write_register(self._select, int.from_bytes(current, "little"))
                remaining = remaining[chunk:]
                position += chunk

    def _read_register(self, index: int) -> int:
        if index == REG_ID:
            return self._id << 24
        if index == REG_VERSION:
            return (self.pins - 1) << 16 | IOAPIC_VERSION
        if index == REG_ARBITRATION:
            return self._id << 24
        pin, high = self._redirection_index(index)
        if pin is None:
            return 0
        entry = self._redirection[pin]
        return entry >> 32 if high else entry & 0xFFFFFFFF

    def _write_register(self, index: int, value: int) -> None:
        if index == REG_ID:
            self._id = (value >> 24) & 0xF
            return
        pin, high = self._redirection_index(index)
        if pin is None:
            return  # version, arbitration and unimplemented registers are read-only
        entry = self._redirection[pin]
        if high:
            entry = (entry & 0xFFFFFFFF) | (value & RTE_WRITABLE_HIGH) << 32
        else:
            preserved = entry & ~RTE_WRITABLE_LOW
            entry = preserved | (value & RTE_WRITABLE_LOW)
            if not entry & RTE_LEVEL:
                entry &= ~RTE_REMOTE_IRR  # Remote IRR means nothing for edge pins
        self._redirection[pin] = entry
        self._service_level(pin)  # unmasking an asserted level pin delivers it

    def _redirection_index(self, index: int) -> tuple[int | None, bool]:
        if REG_REDIRECTION <= index < REG_REDIRECTION + 2 * self.pins:
            return (index - REG_REDIRECTION) >> 1, bool(index & 1)
        return None, False

    # --- inputs -----------------------------------------------------------------------------

    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input `pin` asserted (True) or deasserted."""
        if not 0 <= pin < self.pins:
            raise ValueError(f"ioapic: no pin {pin} (this IOAPIC has {self.pins})")
        bit = 1 << pin
        # A deassertion sends nothing, so defers no wake-up: the bus's lock itself will do (half of
        # the calls of every edge-triggered interrupt, a UART's say, lower the line again).
        with self._lock if level else self._lock.raw:
            was = bool(self._asserted & bit)
            if level:
                self._asserted |= bit
            else:
                self._asserted &= ~bit
            entry = self._redirection[pin]
            if entry & RTE_LEVEL:
                self._service_level(pin)
            elif level and not was and not entry & RTE_MASKED:
                self._send(pin)

    def _service_level(self, pin: int) -> None:
        entry = self._redirection[pin]
        if (entry & RTE_LEVEL and not entry & (RTE_MASKED | RTE_REMOTE_IRR)
                and self._asserted & (1 << pin)):
            if self._send(pin) and self._mode(entry) in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY):
                self._redirection[pin] |= RTE_REMOTE_IRR

    @staticmethod
    def _mode(entry: int) -> int:
        return (entry >> 8) & 7

    def _send(self, pin: int) -> int:
        entry = self._redirection[pin]
        return self._bus.deliver(entry & RTE_VECTOR, self._mode(entry), entry >> 56, bool(entry & RTE_LOGICAL),
                                 level_triggered=bool(entry & RTE_LEVEL))

    def end_of_interrupt(self, vector: int) -> None:
        """EOI broadcast from a LAPIC for a level-triggered `vector`."""
        with self._lock:
            for pin, entry in enumerate(self._redirection):
                if entry & RTE_REMOTE_IRR and entry & RTE_VECTOR == vector:
                    self._redirection[pin] = entry & ~RTE_REMOTE_IRR
                    self._service_level(pin)  # still asserted: send again

    # --- inspection and lifecycle -----------------------------------------------------------

    def redirection(self, pin: int) -> int:
        """The 64-bit redirection entry of `pin`."""
        with self._lock:
            return self._redirection[pin]

    def asserted(self, pin: int) -> bool:
        with self._lock:
            return bool(self._asserted & (1 << pin))

    def reset(self) -> None:
        """Machine reset: registers to power-on state (pins keep their input levels)."""
        with self._lock:
            self._power_on()

    def save(self) -> IoApicState:
        with self._lock:
            return IoApicState(id=self._id, select=self._select, asserted=self._asserted,
                               redirection=tuple(self._redirection))

    def check_restorable(self, state: IoApicState) -> None:
        state = require(state, IoApicState)
        if len(state.redirection) != self.pins:
            state.fail("redirection", f"{len(state.redirection)} entries, this IOAPIC has {self.pins} pins")
        if state.asserted >> self.pins:
            state.fail("asserted", f"{state.asserted:#x} has pins beyond {self.pins}")

    def restore(self, state: IoApicState) -> None:
        """Load registers and pin levels; nothing is delivered (the LAPICs' IRRs are restored with them)."""
        self.check_restorable(state)
        with self._lock:
            self._id, self._select, self._asserted = state.id, state.select, state.asserted
            self._redirection = list(state.redirection)
