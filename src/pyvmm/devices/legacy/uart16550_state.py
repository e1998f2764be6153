"""The 16550A's saved state (a module of its own: the UART is compiled, see pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ...persist import State
from .uart16550_registers import FCR_STORED_BITS, IER_MASK, IER_THRI, MCR_MASK, MSR_DELTA_MASK


@dataclass(frozen=True)
class UartState(State):
    """The registers and the receive FIFO; the transmitter is always empty, so nothing is in flight."""
    KIND = "uart16550"
    dll: int
    dlm: int
    ier: int
    fcr: int
    lcr: int
    mcr: int
    scr: int
    overrun: bool
    msr_delta: int
    thre_pending: bool
    rx_fifo: bytes

    def validate(self) -> None:
        for name in ("dll", "dlm", "lcr", "scr"):
            self.check_range(name, 0, 0xFF)
        self.check_mask("ier", IER_MASK)
        self.check_mask("fcr", FCR_STORED_BITS)
        self.check_mask("mcr", MCR_MASK)
        self.check_mask("msr_delta", MSR_DELTA_MASK)
        if self.thre_pending and not self.ier & IER_THRI:
            self.fail("thre_pending", "set while IER does not enable the THRE interrupt")
