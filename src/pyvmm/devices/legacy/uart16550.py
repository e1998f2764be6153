"""16550A UART, as Linux's 8250 driver and simple polling guests drive it.

Registers, by offset from the base (COM1 is 0x3f8, length 8, IRQ 4):

    0  RBR (read) / THR (write)    DLL while LCR.DLAB is set
    1  IER                         DLM while LCR.DLAB is set
    2  IIR (read) / FCR (write)
    3  LCR      4  MCR      5  LSR      6  MSR      7  SCR

LSR always shows THRE|TEMT: the guest never waits for the line. The bytes of a load go to
`output` together, when the transmitter drains (below): a line the tty sends is one call,
not one per byte (a UART without `timers`, which could not bound that wait, sends each THR
byte at once). The receiver is a bounded FIFO the host fills with `receive()`.

The THRE interrupt comes back when the transmitter has drained, which this one does at the
guest's next access to any other register (the guest finds it empty, as if the line were
infinitely fast), or, if none comes, once the bytes would have gone out at the programmed
baud rate (a timer, when the UART has `timers`). A THR write clears the interrupt. Linux's
8250 driver writes a load of up to 16 bytes, then either turns the THRE interrupt off (IER:
nothing left to send) or reads IIR again in its handler's loop, which finds THRE and sends
the next load: one interrupt per write() from the tty, not one per load. (The transmitter
that emptied at once raised THRE at the first byte of a load, an edge latched while the
handler still ran: a second, spurious interrupt for every start of transmission, and for
every byte without the FIFO.)

The interrupt output is gated by MCR.OUT2, as on a PC where OUT2 enables the IRQ
line's driver: Linux sets OUT2 when it wants interrupts; polling guests never need them.
Receiver-line-status interrupts (IER bit 2) are not generated; OE is still reported in LSR.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Final

from ...bus.interrupt import IrqLine
from ..rate_limiter import TimerHandle, Timers
from .uart16550_registers import (
    DLL, DLM, FCR_CLEAR_RCVR, FCR_CLEAR_XMIT, FCR_ENABLE_FIFO, FCR_STORED_BITS, IER, IER_MASK,
    IER_MSI, IER_RDI, IER_THRI, IIR_FCR, IIR_FIFO_ENABLED, IIR_MSI, IIR_NO_INT, IIR_RDI, IIR_THRI,
    LCR, LCR_DLAB, LSR, LSR_DR, LSR_OE, LSR_TEMT, LSR_THRE, MCR, MCR_DTR, MCR_LOOP, MCR_MASK,
    MCR_OUT1, MCR_OUT2, MCR_RTS, MSR, MSR_CTS, MSR_DCD, MSR_DCTS, MSR_DDCD, MSR_DDSR, MSR_DSR,
    MSR_LINES_CONNECTED, MSR_RI, MSR_TERI, RBR_THR, SCR,
)
from .uart16550_state import UartState

log = logging.getLogger(__name__)

RX_FIFO_CAPACITY: Final = 64
TX_FIFO_SIZE: Final = 16  # a 16550A's transmit FIFO: the bytes the drain timer allows time for
BITS_PER_CHARACTER: Final = 10  # start, 8 data, stop: the drain timer's estimate (LCR's framing ignored)
DEFAULT_DIVISOR: Final = 12  # 9600 baud: meaningless for a virtual line, kept for guests that read it back
BAUD_BASE: Final = 115200


@dataclass
class UartStats:
    tx_bytes: int = 0       # bytes handed to `output`
    rx_bytes: int = 0       # host bytes accepted into the receive FIFO
    rx_overruns: int = 0    # bytes dropped because the FIFO was full (LSR.OE set)
    rx_discarded: int = 0   # host bytes dropped while in loopback (the serial input is disconnected)
    loopback_bytes: int = 0  # THR bytes looped back into the receive FIFO


class Uart16550:
    """A 16550A. `output` is called with the transmitted bytes, under the device lock: it must
    not call back into this UART. `timers` (the I/O thread) end a transmission the guest does
    not look at again; without them the THRE interrupt waits for its next access, and each
    byte is output as it is written. `flush_output()` sends a load still in the transmitter
    (the VM calls it when it stops)."""

    def __init__(self, irq: IrqLine, output: Callable[[bytes], None], *,
                 rx_capacity: int = RX_FIFO_CAPACITY, timers: Timers | None = None) -> None:
        if rx_capacity < 16:
            raise ValueError(f"a 16550A receive FIFO holds at least 16 bytes, not {rx_capacity}")
        self._irq = irq
        self._output = output
        self.rx_capacity = rx_capacity
        self.stats = UartStats()
        self._lock = threading.Lock()
        # Host input threads wait on this for the guest to drain the receive FIFO.
        self._rx_drained = threading.Condition(self._lock)
        self._rx: deque[int] = deque()
        self._irq_level = False
        self._overrun_logged = False
        self._timers = timers
        self._drain_timer: TimerHandle | None = None  # at most one outstanding
        self._sending = bytearray()  # the load in the transmitter: output when it drains
        self._power_on()

    def _power_on(self) -> None:
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._ier = 0
        self._fcr = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._overrun = False
        self._msr_delta = 0
        self._thre_pending = False
        self._transmitting = False  # THR written since the transmitter last drained
        self._rx.clear()

    # --- guest side ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if self._transmitting:
                self._drain()
            if size == 1:  # (every guest access: no generator)
                data = bytes((self._read_register(offset),))
            else:
                data = bytes(self._read_register(offset + i) for i in range(size))
            self._update_irq()
        return data

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if len(data) == 1:  # (every guest access: no enumerate)
                self._write_register(offset, data[0])
            else:
                for i, value in enumerate(data):
                    self._write_register(offset + i, value)
            self._update_irq()

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            return self._dll if dlab else self._pop_rx()
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = self._lsr()
            self._overrun = False  # OE is cleared by reading LSR
            return value
        if offset == MSR:
            value = self._msr_lines() | self._msr_delta
            self._msr_delta = 0  # delta bits are cleared by reading MSR
            return value
        if offset == SCR:
            return self._scr
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR and not dlab:
            self._transmit(value)
            return
        if self._transmitting:
            self._drain()
        if offset == RBR_THR:
            self._dll = value
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            if (value ^ self._lcr) & ~LCR_DLAB:
                log.debug("uart: line control %#04x", value)
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes are factory-test features of the real chip: ignored.

    def _transmit(self, value: int) -> None:
        self._thre_pending = False  # writing THR clears the THRE interrupt until the drain
        if not self._transmitting:
            self._transmitting = True
            if self._timers is not None and self._drain_timer is None:
                divisor = self._dlm << 8 | self._dll or DEFAULT_DIVISOR  # (0 stops a real chip's clock)
                delay_ns = TX_FIFO_SIZE * BITS_PER_CHARACTER * divisor * 10**9 // BAUD_BASE
                self._drain_timer = self._timers.call_later(delay_ns, self._drain_timer_fired)
        if self._mcr & MCR_LOOP:
            self.stats.loopback_bytes += 1
            self._push_rx(value)
        else:
            self._sending.append(value)
            if self._timers is None:
                self._send()  # nothing would bound the wait for the drain: out at once

    def _drain(self) -> None:
        """The transmitter has emptied: its bytes are out, and THRE interrupts again if enabled."""
        self._transmitting = False
        self._thre_pending = bool(self._ier & IER_THRI)
        self._send()

    def _send(self) -> None:
        """Output the load in the transmitter, if any."""
        if self._sending:
            self.stats.tx_bytes += len(self._sending)
            self._output(bytes(self._sending))
            self._sending.clear()

    def flush_output(self) -> None:
        """Output the bytes still in the transmitter (interrupts unchanged: the guest sees the
        transmitter drain when it next looks)."""
        with self._lock:
            self._send()

    def pause(self) -> None:
        """The VM holds still (a Pausable): the bytes the guest wrote leave now, not at resume
        (the drain timer waits with the VM's other timers). The guest's view is unchanged, as
        for flush_output()."""
        self.flush_output()

    def resume(self) -> None:
        pass

    def _drain_timer_fired(self) -> None:
        with self._lock:
            self._drain_timer = None
            if self._transmitting:  # (a load begun after the timer was set drains early: harmless)
                self._drain()
                self._update_irq()

    def _write_ier(self, value: int) -> None:
        value &= IER_MASK
        newly_enabled = value & ~self._ier
        self._ier = value
        if not value & IER_THRI:
            self._thre_pending = False
        elif newly_enabled & IER_THRI:
            self._thre_pending = True  # THR is always empty: enabling ETBEI interrupts at once

    def _write_fcr(self, value: int) -> None:
        if not value & FCR_ENABLE_FIFO:
            value = 0  # the other FCR bits only take when the FIFO enable bit is written with them
        if (value ^ self._fcr) & FCR_ENABLE_FIFO:
            value |= FCR_CLEAR_RCVR | FCR_CLEAR_XMIT  # switching FIFO mode empties both FIFOs
        if value & FCR_CLEAR_RCVR:
            self._clear_rx()
        # The transmit FIFO is always empty: nothing to clear.
        self._fcr = value & FCR_STORED_BITS

    def _write_mcr(self, value: int) -> None:
        was_loopback = self._mcr & MCR_LOOP
        old_lines = self._msr_lines()
        self._mcr = value & MCR_MASK
        new_lines = self._msr_lines()
        changed = old_lines ^ new_lines
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        if old_lines & MSR_RI and not new_lines & MSR_RI:
            self._msr_delta |= MSR_TERI  # trailing edge of ring indicator only
        if was_loopback and not self._mcr & MCR_LOOP:
            self._rx_drained.notify_all()  # host input is accepted again

    def _msr_lines(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_LINES_CONNECTED
        # Loopback wires the modem outputs back to the inputs (Linux's autoconfig checks this).
        lines = 0
        if mcr & MCR_RTS:
            lines |= MSR_CTS
        if mcr & MCR_DTR:
            lines |= MSR_DSR
        if mcr & MCR_OUT1:
            lines |= MSR_RI
        if mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT
        if self._rx:
            value |= LSR_DR
        if self._overrun:
            value |= LSR_OE
        return value

    def _interrupt_id(self) -> int:
        if self._rx and self._ier & IER_RDI:
            return IIR_RDI
        if self._thre_pending:
            return IIR_THRI
        if self._msr_delta and self._ier & IER_MSI:
            return IIR_MSI
        return IIR_NO_INT

    def _read_iir(self) -> int:
        interrupt_id = self._interrupt_id()
        if interrupt_id == IIR_THRI:
            self._thre_pending = False  # reading IIR acknowledges a THRE interrupt
        return interrupt_id | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE_FIFO else 0)

    def _line_level(self) -> bool:
        """The IRQ line: an interrupt identified, gated by MCR.OUT2."""
        return bool(self._mcr & MCR_OUT2) and self._interrupt_id() != IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._line_level()
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    def _pop_rx(self) -> int:
        if not self._rx:
            return 0
        value = self._rx.popleft()
        self._rx_drained.notify_all()
        return value

    def _push_rx(self, value: int) -> bool:
        if len(self._rx) >= self.rx_capacity:
            self._overrun = True
            self.stats.rx_overruns += 1
            if not self._overrun_logged:
                self._overrun_logged = True
                log.info("uart: receive FIFO full, input dropped (further overruns only counted)")
            return False
        self._rx.append(value)
        return True

    def _clear_rx(self) -> None:
        self._rx.clear()
        self._rx_drained.notify_all()

    # --- host side ----------------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were accepted.

        Bytes that do not fit are dropped and counted as overruns (LSR.OE): check
        `rx_space()` or `wait_rx_space()` first to avoid that. In loopback the serial
        input is disconnected, so everything is discarded."""
        with self._lock:
            if self._mcr & MCR_LOOP:
                self.stats.rx_discarded += len(data)
                return 0
            accepted = 0
            for value in data:
                if not self._push_rx(value):
                    self.stats.rx_overruns += len(data) - accepted - 1
                    break
                accepted += 1
            self.stats.rx_bytes += accepted
            self._update_irq()
        return accepted

    def _rx_space_locked(self) -> int:
        if self._mcr & MCR_LOOP:
            return 0
        return self.rx_capacity - len(self._rx)

    def rx_space(self) -> int:
        """How many bytes `receive()` would accept now (0 while in loopback)."""
        with self._lock:
            return self._rx_space_locked()

    def wait_rx_space(self, timeout: float | None = None) -> int:
        """Block until `receive()` would accept at least one byte, or `timeout` passes;
        returns the space then available."""
        with self._rx_drained:
            self._rx_drained.wait_for(lambda: self._rx_space_locked() > 0, timeout)
            return self._rx_space_locked()

    @property
    def divisor(self) -> int:
        with self._lock:
            return self._dlm << 8 | self._dll

    @property
    def baud(self) -> int:
        divisor = self.divisor
        return BAUD_BASE // divisor if divisor else 0

    @property
    def irq_level(self) -> bool:
        """The level this UART drives on its interrupt line."""
        with self._lock:
            return self._irq_level

    # --- lifecycle ----------------------------------------------------------------------

    def reset(self) -> None:
        """Back to power-on state (machine reset); the receive FIFO is emptied."""
        with self._lock:
            self._send()  # a load written before the reset goes out first
            self._power_on()
            self._rx_drained.notify_all()
            self._update_irq()

    def save(self) -> UartState:
        with self._lock:
            # bytes still "in the transmitter" went out: the restored one has drained
            self._send()
            thre_pending = bool(self._ier & IER_THRI) if self._transmitting else self._thre_pending
            return UartState(dll=self._dll, dlm=self._dlm, ier=self._ier, fcr=self._fcr, lcr=self._lcr,
                             mcr=self._mcr, scr=self._scr, overrun=self._overrun, msr_delta=self._msr_delta,
                             thre_pending=thre_pending, rx_fifo=bytes(self._rx))

    def restore(self, state: UartState) -> None:
        """Load a `save()` result. The interrupt line is driven to the restored level
        (set_level is called even if unchanged, so a fresh line matches the device)."""
        if len(state.rx_fifo) > self.rx_capacity:
            state.fail("rx_fifo", f"{len(state.rx_fifo)} bytes, this UART's FIFO holds {self.rx_capacity}")
        with self._lock:
            self._dll, self._dlm, self._ier, self._fcr = state.dll, state.dlm, state.ier, state.fcr
            self._lcr, self._mcr, self._scr, self._msr_delta = state.lcr, state.mcr, state.scr, state.msr_delta
            self._overrun = state.overrun
            self._thre_pending = state.thre_pending
            self._transmitting = False
            self._sending.clear()  # (a load of the state this one replaces)
            self._rx = deque(state.rx_fifo)
            self._irq_level = self._line_level()
            self._irq.set_level(self._irq_level)
            self._rx_drained.notify_all()
