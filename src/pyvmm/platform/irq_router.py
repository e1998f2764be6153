"""ISA interrupt lines wired to both the 8259 pair and the IOAPIC, as on a PC.

Each ISA IRQ reaches PIC input `irq` and IOAPIC pin `irq`, except IRQ 0 (the PIT), which
arrives at IOAPIC pin 2 -- the interrupt source override the MADT announces. IRQ 2 is the
PIC cascade and has no ISA line. GSIs 16-23 exist on the IOAPIC only (PCI INTx).

Whichever controller the guest uses sees the line; the other one has it masked.
"""

from __future__ import annotations

import logging
from typing import Final

from .ioapic import IoApic
from .pic import CASCADE_IRQ, Pic8259Pair

log = logging.getLogger(__name__)

ISA_IRQS: Final = 16
IRQ0_GSI: Final = 2  # MADT interrupt source override: ISA IRQ 0 -> GSI 2


def isa_irq_to_gsi(irq: int) -> int:
    return IRQ0_GSI if irq == 0 else irq


class IsaIrqLine:
    """An IrqLine driving one ISA IRQ on both controllers. Safe to call from any thread."""

    def __init__(self, pic: Pic8259Pair, ioapic: IoApic, irq: int) -> None:
        self._pic = pic
        self._ioapic = ioapic
        self.irq = irq
        self.gsi = isa_irq_to_gsi(irq)

    def set_level(self, high: bool) -> None:
        self._pic.set_irq(self.irq, high)
        self._ioapic.set_irq(self.gsi, high)

    def trigger(self) -> None:
        self.set_level(True)
        self.set_level(False)

    def __repr__(self) -> str:
        return f"IsaIrqLine(irq={self.irq}, gsi={self.gsi})"


class GsiLine:
    """An IrqLine on an IOAPIC pin with no ISA IRQ behind it."""

    def __init__(self, ioapic: IoApic, gsi: int) -> None:
        self._ioapic = ioapic
        self.gsi = gsi

    def set_level(self, high: bool) -> None:
        self._ioapic.set_irq(self.gsi, high)

    def trigger(self) -> None:
        self.set_level(True)
        self.set_level(False)

    def __repr__(self) -> str:
        return f"GsiLine(gsi={self.gsi})"


class IsaIrqRouter:
    def __init__(self, pic: Pic8259Pair, ioapic: IoApic) -> None:
        self.pic = pic
        self.ioapic = ioapic
        self._lines: dict[int, IsaIrqLine] = {}
        self._gsi_lines: dict[int, GsiLine] = {}

    def line(self, irq: int) -> IsaIrqLine:
        """The line for ISA IRQ `irq` (0-15, not 2)."""
        if not 0 <= irq < ISA_IRQS or irq == CASCADE_IRQ:
            raise ValueError(f"irq router: no ISA line for IRQ {irq} (0-15; 2 is the PIC cascade)")
        if irq not in self._lines:
            self._lines[irq] = IsaIrqLine(self.pic, self.ioapic, irq)
        return self._lines[irq]

    def gsi_line(self, gsi: int) -> GsiLine:
        """The line for an IOAPIC-only GSI (16 up to the IOAPIC's pin count)."""
        if not ISA_IRQS <= gsi < self.ioapic.pins:
            raise ValueError(f"irq router: GSI {gsi} is not an IOAPIC-only pin (16-{self.ioapic.pins - 1})")
        if gsi not in self._gsi_lines:
            self._gsi_lines[gsi] = GsiLine(self.ioapic, gsi)
        return self._gsi_lines[gsi]
