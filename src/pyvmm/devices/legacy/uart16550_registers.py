"""The 16550A's registers: offsets from the base and their bits."""

REGISTER_COUNT = 8

# Register offsets.
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
DLL = 0  # while LCR.DLAB
DLM = 1

IER_RDI = 0x01    # receive data available
IER_THRI = 0x02   # transmitter holding register empty
IER_RLSI = 0x04   # receiver line status (accepted, never raised)
IER_MSI = 0x08    # modem status change
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_STORED_BITS = 0xC9  # enable, DMA mode, trigger level; the clear bits self-reset

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA_MASK = 0x0F
# Outside loopback a terminal is always attached and ready; RI is never rung.
MSR_LINES_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS
