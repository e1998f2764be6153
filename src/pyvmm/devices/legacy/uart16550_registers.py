"""The 16550A's registers: offsets from the base and their bits."""

from typing import Final

REGISTER_COUNT: Final = 8

# Register offsets.
RBR_THR: Final = 0
IER: Final = 1
IIR_FCR: Final = 2
LCR: Final = 3
MCR: Final = 4
LSR: Final = 5
MSR: Final = 6
SCR: Final = 7
DLL: Final = 0  # while LCR.DLAB
DLM: Final = 1

IER_RDI: Final = 0x01    # receive data available
IER_THRI: Final = 0x02   # transmitter holding register empty
IER_RLSI: Final = 0x04   # receiver line status (accepted, never raised)
IER_MSI: Final = 0x08    # modem status change
IER_MASK: Final = 0x0F

IIR_NO_INT: Final = 0x01
IIR_MSI: Final = 0x00
IIR_THRI: Final = 0x02
IIR_RDI: Final = 0x04
IIR_FIFO_ENABLED: Final = 0xC0

FCR_ENABLE_FIFO: Final = 0x01
FCR_CLEAR_RCVR: Final = 0x02
FCR_CLEAR_XMIT: Final = 0x04
FCR_STORED_BITS: Final = 0xC9  # enable, DMA mode, trigger level; the clear bits self-reset

LCR_DLAB: Final = 0x80

MCR_DTR: Final = 0x01
MCR_RTS: Final = 0x02
MCR_OUT1: Final = 0x04
MCR_OUT2: Final = 0x08
MCR_LOOP: Final = 0x10
MCR_MASK: Final = 0x1F

LSR_DR: Final = 0x01
LSR_OE: Final = 0x02
LSR_THRE: Final = 0x20
LSR_TEMT: Final = 0x40

MSR_DCTS: Final = 0x01
MSR_DDSR: Final = 0x02
MSR_TERI: Final = 0x04
MSR_DDCD: Final = 0x08
MSR_CTS: Final = 0x10
MSR_DSR: Final = 0x20
MSR_RI: Final = 0x40
MSR_DCD: Final = 0x80
MSR_DELTA_MASK: Final = 0x0F
# Outside loopback a terminal is always attached and ready; RI is never rung.
MSR_LINES_CONNECTED: Final = MSR_DCD | MSR_DSR | MSR_CTS
