"""i8042 PS/2 controller: the CPU reset line, and enough of a keyboard for Linux's probe.

pyvmm registers one device over ports 0x60-0x64 (length PORT_COUNT = 5):

    offset 0 (0x60)  data: reads pop the output buffer; writes go to the keyboard, or
                     are the data byte of a controller command (0x60, 0xD1 ... 0xD4)
    offset 4 (0x64)  read: status register; write: controller command
    offsets 1-3      not this chip's (0x61 is the PC speaker/NMI port): read 0xff

No key presses are ever produced; the keyboard only answers commands (0xFA ACK,
0xAA after reset, its ID). No mouse is attached: bytes sent to it come back as an
error with the status timeout bit set. Interrupt lines are optional: without them
Linux's i8042/atkbd probes still finish, only after their timeouts.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ...bus.interrupt import IrqLine, NullIrqLine
from ...persist import State

log = logging.getLogger(__name__)

PORT_COUNT = 5
DATA_PORT = 0
COMMAND_PORT = 4

STATUS_OBF = 0x01        # output buffer full: a byte waits at the data port
STATUS_IBF = 0x02        # input buffer full: never, commands are taken at once
STATUS_SYS = 0x04        # system flag, mirrors the command byte's
STATUS_CMD = 0x08        # the last write went to the command port
STATUS_UNLOCKED = 0x10   # keyboard lock switch off
STATUS_AUXDATA = 0x20    # the byte in the output buffer came from the aux (mouse) port
STATUS_TIMEOUT = 0x40

CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
# What a BIOS typically leaves: keyboard interrupt on, POST passed, set-1 translation.
CTR_POWER_ON = CTR_KBDINT | CTR_SYS | CTR_XLATE

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_OUTPUT = 0xD2   # the next data byte appears as if sent by the keyboard
CMD_WRITE_AUX_OUTPUT = 0xD3   # ... as if sent by the mouse (Linux's AUX loopback test)
CMD_WRITE_AUX = 0xD4          # the next data byte goes to the mouse
CMD_PULSE_RESET = 0xFE        # 0xF0-0xFF pulse output port bits 0-3 whose command bit is 0

SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00

OUTPUT_PORT_RESET = 0x01      # active low: 0 holds the CPU in reset
OUTPUT_PORT_A20 = 0x02
OUTPUT_PORT_POWER_ON = OUTPUT_PORT_RESET | OUTPUT_PORT_A20

KBD_CMD_SET_LEDS = 0xED
KBD_CMD_ECHO = 0xEE
KBD_CMD_SCANCODE_SET = 0xF0
KBD_CMD_GET_ID = 0xF2
KBD_CMD_SET_TYPEMATIC = 0xF3
KBD_CMD_RESET = 0xFF
KBD_COMMANDS_WITH_PARAMETER = (KBD_CMD_SET_LEDS, KBD_CMD_SCANCODE_SET, KBD_CMD_SET_TYPEMATIC)
KBD_ACK = 0xFA
KBD_SELF_TEST_PASSED = 0xAA
KBD_ID = (0xAB, 0x83)
PS2_ERROR = 0xFE
# The controller's set-2 -> set-1 translation of what the keyboard reports about itself.
XLATE_ID_BYTE = {0x83: 0x41}
XLATE_SCANCODE_SET = {1: 0x43, 2: 0x41, 3: 0x3F}

OUTPUT_QUEUE_LIMIT = 16


class I8042:
    """`on_reset` is called (outside the device lock) when the guest pulses the CPU reset line."""

    def __init__(self, on_reset: Callable[[], None], *, kbd_irq: IrqLine | None = None,
                 aux_irq: IrqLine | None = None) -> None:
        self._on_reset = on_reset
        self._kbd_irq = kbd_irq or NullIrqLine()
        self._aux_irq = aux_irq or NullIrqLine()
        self._lock = threading.Lock()
        # Bytes waiting for the guest, each with the status bits it shows (AUXDATA, TIMEOUT).
        # A real controller holds one; the queue stands in for devices that wait their turn.
        self._output: deque[tuple[int, int]] = deque()
        self._kbd_level = False
        self._aux_level = False
        self.resets_requested = 0
        self._power_on()

    def _power_on(self) -> None:
        self._ctr = CTR_POWER_ON
        self._output_port = OUTPUT_PORT_POWER_ON
        self._pending_command: int | None = None       # controller command awaiting its data byte
        self._kbd_pending_command: int | None = None   # keyboard command awaiting its parameter
        self._scancode_set = 2
        self._last_write_was_command = False
        self._last_data = 0
        self._reset_requested = False
        self._output.clear()

    # --- guest side ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            data = bytes(self._read_port(offset + i) for i in range(size))
            self._update_irqs()
        return data

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                port = offset + i
                if port == DATA_PORT:
                    self._write_data(value)
                elif port == COMMAND_PORT:
                    self._write_command(value)
            self._update_irqs()
            reset, self._reset_requested = self._reset_requested, False
            if reset:
                self.resets_requested += 1
        if reset:
            # Outside the lock: a machine reset may well reset this device too.
            log.info("i8042: guest pulsed the CPU reset line")
            self._on_reset()

    def _read_port(self, port: int) -> int:
        if port == DATA_PORT:
            if self._output:
                self._last_data = self._output.popleft()[0]
            return self._last_data  # an empty buffer reads its stale byte, as on hardware
        if port == COMMAND_PORT:
            return self._status()
        return 0xFF

    def _status(self) -> int:
        status = STATUS_UNLOCKED
        if self._ctr & CTR_SYS:
            status |= STATUS_SYS
        if self._last_write_was_command:
            status |= STATUS_CMD
        if self._output:
            status |= STATUS_OBF | self._output[0][1]
        return status

    def _write_command(self, command: int) -> None:
        self._last_write_was_command = True
        self._pending_command = None  # a new command abandons one still waiting for data
        if command == CMD_READ_CTR:
            self._queue(self._ctr)
        elif 0x21 <= command <= 0x3F:
            self._queue(0)  # controller RAM, not modelled
        elif command == CMD_WRITE_CTR or 0x61 <= command <= 0x7F or \
                CMD_WRITE_OUTPUT_PORT <= command <= CMD_WRITE_AUX:
            self._pending_command = command
        elif command == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUXDIS
        elif command == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUXDIS
        elif command == CMD_AUX_TEST:
            self._queue(INTERFACE_TEST_PASSED)
        elif command == CMD_SELF_TEST:
            self._queue(SELF_TEST_PASSED)
        elif command == CMD_KBD_TEST:
            self._queue(INTERFACE_TEST_PASSED)
        elif command == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBDDIS
        elif command == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBDDIS
        elif command == CMD_READ_OUTPUT_PORT:
            self._queue(self._output_port)
        elif command >= 0xF0:
            if not command & OUTPUT_PORT_RESET:
                self._reset_requested = True
        else:
            log.debug("i8042: command %#04x ignored", command)

    def _write_data(self, value: int) -> None:
        self._last_write_was_command = False
        command, self._pending_command = self._pending_command, None
        if command is None:
            self._keyboard_receive(value)
        elif command == CMD_WRITE_CTR:
            self._ctr = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            if not value & OUTPUT_PORT_RESET:
                self._reset_requested = True
            if not value & OUTPUT_PORT_A20:
                log.debug("i8042: guest disabled A20 (not emulated: A20 stays enabled)")
            # The reset is a pulse here: the machine restarts at once, the line returns high.
            self._output_port = value | OUTPUT_PORT_RESET
        elif command == CMD_WRITE_KBD_OUTPUT:
            self._queue(value)
        elif command == CMD_WRITE_AUX_OUTPUT:
            self._queue(value, STATUS_AUXDATA)
        elif command == CMD_WRITE_AUX:
            self._queue(PS2_ERROR, STATUS_AUXDATA | STATUS_TIMEOUT)  # no mouse answers
        # 0x61-0x7F write controller RAM: accepted and forgotten.

    def _keyboard_receive(self, value: int) -> None:
        """A byte for the keyboard: a command, or the parameter of the previous one."""
        translate = self._ctr & CTR_XLATE
        command, self._kbd_pending_command = self._kbd_pending_command, None
        if command is not None:
            self._queue(KBD_ACK)
            if command == KBD_CMD_SCANCODE_SET:
                if value == 0:
                    current = self._scancode_set
                    self._queue(XLATE_SCANCODE_SET[current] if translate else current)
                elif value in (1, 2, 3):
                    self._scancode_set = value
            return
        if value == KBD_CMD_RESET:
            self._scancode_set = 2
            self._queue(KBD_ACK)
            self._queue(KBD_SELF_TEST_PASSED)
        elif value == KBD_CMD_ECHO:
            self._queue(KBD_CMD_ECHO)
        elif value == KBD_CMD_GET_ID:
            self._queue(KBD_ACK)
            for byte in KBD_ID:
                self._queue(XLATE_ID_BYTE.get(byte, byte) if translate else byte)
        else:
            self._queue(KBD_ACK)
            if value in KBD_COMMANDS_WITH_PARAMETER:
                self._kbd_pending_command = value

    def _queue(self, value: int, status_bits: int = 0) -> None:
        if len(self._output) >= OUTPUT_QUEUE_LIMIT:
            log.debug("i8042: output buffer overflow, %#04x dropped", value)
            return
        self._output.append((value, status_bits))

    def _irq_levels(self) -> tuple[bool, bool]:
        # Each line is high while a byte from its port waits and its interrupt is enabled.
        if not self._output:
            return False, False
        if self._output[0][1] & STATUS_AUXDATA:
            return False, bool(self._ctr & CTR_AUXINT)
        return bool(self._ctr & CTR_KBDINT), False

    def _update_irqs(self, force: bool = False) -> None:
        kbd, aux = self._irq_levels()
        if force or kbd != self._kbd_level:
            self._kbd_level = kbd
            self._kbd_irq.set_level(kbd)
        if force or aux != self._aux_level:
            self._aux_level = aux
            self._aux_irq.set_level(aux)

    # --- lifecycle ----------------------------------------------------------------------

    def reset(self) -> None:
        """Back to power-on state (machine reset)."""
        with self._lock:
            self._power_on()
            self._update_irqs()

    def save(self) -> I8042State:
        with self._lock:
            return I8042State(
                ctr=self._ctr, output_port=self._output_port, pending_command=self._pending_command,
                kbd_pending_command=self._kbd_pending_command, scancode_set=self._scancode_set,
                last_write_was_command=self._last_write_was_command, last_data=self._last_data,
                output=tuple(self._output))

    def restore(self, state: I8042State) -> None:
        """Load a `save()` result; both interrupt lines are driven to the restored level."""
        with self._lock:
            self._ctr = state.ctr
            self._output_port = state.output_port
            self._scancode_set = state.scancode_set
            self._last_data = state.last_data
            self._pending_command = state.pending_command
            self._kbd_pending_command = state.kbd_pending_command
            self._last_write_was_command = state.last_write_was_command
            self._reset_requested = False
            self._output = deque(state.output)
            self._update_irqs(force=True)


@dataclass(frozen=True)
class I8042State(State):
    """The controller's registers, the commands awaiting a data byte, and the bytes queued for
    the guest (value, status bits)."""
    KIND = "i8042"
    ctr: int
    output_port: int
    pending_command: int | None
    kbd_pending_command: int | None
    scancode_set: int
    last_write_was_command: bool
    last_data: int
    output: tuple[tuple[int, int], ...]

    def validate(self) -> None:
        for name in ("ctr", "output_port", "last_data"):
            self.check_range(name, 0, 0xFF)
        for name in ("pending_command", "kbd_pending_command"):
            if getattr(self, name) is not None:
                self.check_range(name, 0, 0xFF)
        if self.scancode_set not in XLATE_SCANCODE_SET:
            self.fail("scancode_set", f"{self.scancode_set} is not 1, 2 or 3")
        if len(self.output) > OUTPUT_QUEUE_LIMIT:
            self.fail("output", f"{len(self.output)} queued bytes, at most {OUTPUT_QUEUE_LIMIT}")
        for i, (value, bits) in enumerate(self.output):
            if not 0 <= value <= 0xFF or bits & ~(STATUS_AUXDATA | STATUS_TIMEOUT) or bits < 0:
                self.fail(f"output[{i}]", f"({value}, {bits:#x}) is not a byte with AUXDATA/TIMEOUT bits")
