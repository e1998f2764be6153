"""Two cascaded 8259A programmable interrupt controllers and the PIIX edge/level register.

Port map (three separate bus ranges, each a small view of the one `Pic8259Pair`):

    0x20 command (ICW1, OCW2, OCW3; reads IRR/ISR/poll)   0x21 data (ICW2-4, IMR)   master
    0xA0 command                                          0xA1 data                 slave, on master IR2
    0x4D0 ELCR for IRQ 0-7      0x4D1 ELCR for IRQ 8-15 (1 = level-triggered)

Input side: `set_irq(irq, level)` for ISA IRQs 0-15. In edge mode a rising edge latches
the request in IRR and the request stays latched when the line falls (so a pulse counts);
in level mode (ELCR bit, or ICW1.LTIM for the whole chip) IRR follows the line. The
slave's INT output reaches the master's IR2 as a level, whatever the master's mode, so a
slave that stays asserted across an acknowledge is never lost.

Output side: `interrupt_pending()` is the master's INT pin; `acknowledge()` is the CPU's
INTA cycle and returns the vector. With nothing left to deliver at INTA time the chip
answers with its IR7 vector without setting ISR (the "spurious IRQ7/IRQ15" Linux checks
for by reading ISR).

Threads: `set_irq` may come from any thread; everything else from the CPU thread. All
public methods take one lock. `on_wakeup` (if set) is called after the lock is released
whenever the INT output goes from idle to asserted: it must not block.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Final

from ..persist import require
from .pic_state import INIT_ICW2, INIT_ICW3, INIT_ICW4, INIT_READY, PicChipState, PicPairState

log = logging.getLogger(__name__)

CASCADE_IRQ: Final = 2
MASTER_ELCR_MASK: Final = 0xF8  # IRQ 0, 1, 2 are always edge-triggered on the PIIX
SLAVE_ELCR_MASK: Final = 0xDE   # IRQ 8 (RTC) and 13 (FPU) likewise

ICW1: Final = 0x10
ICW1_IC4: Final = 0x01
ICW1_SNGL: Final = 0x02
ICW1_LTIM: Final = 0x08
ICW4_UPM: Final = 0x01
ICW4_AEOI: Final = 0x02
ICW4_SFNM: Final = 0x10
OCW3: Final = 0x08
OCW3_POLL: Final = 0x04
OCW3_READ_REGISTER: Final = 0x02
OCW3_READ_ISR: Final = 0x01
OCW3_SPECIAL_MASK: Final = 0x40
OCW3_SET_SPECIAL_MASK: Final = 0x20


def _priority_order(priority_base: int):
    """IR numbers from highest to lowest priority (after rotation)."""
    return [(priority_base + i) & 7 for i in range(8)]


class _Chip:
    """One 8259A. Pure state; the pair does locking and cascading."""

    def __init__(self, name: str, is_master: bool, elcr_mask: int) -> None:
        self.name = name
        self.is_master = is_master
        self.elcr_mask = elcr_mask
        self.elcr = 0
        self.line_levels = 0  # the IR pins as the devices drive them
        self.reset()

    def reset(self) -> None:
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.vector_base = 0x08 if self.is_master else 0x70  # PC BIOS defaults
        self.priority_base = 0  # IR0 highest
        self.init_state = INIT_READY
        self.icw4_expected = False
        self.single = False
        self.level_mode = False  # ICW1.LTIM: every input level-triggered
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.special_mask = False
        self.read_isr = False
        self.poll_pending = False
        self.cascade_id = CASCADE_IRQ if self.is_master else 0  # ICW3

    # --- trigger modes ----------------------------------------------------------------------

    def level_triggered(self) -> int:
        """Bitmask of IRs that are level-triggered."""
        return 0xFF if self.level_mode else self.elcr

    def set_input(self, ir: int, level: bool) -> None:
        bit = 1 << ir
        was_high = self.line_levels & bit
        level_triggered = self.level_triggered()
        if level:
            self.line_levels |= bit
            if level_triggered & bit or not was_high:
                self.irr |= bit
        else:
            self.line_levels &= ~bit
            if level_triggered & bit:
                self.irr &= ~bit

    def resync_level_inputs(self) -> None:
        """Level-triggered IRR bits mirror their lines (after an ELCR or LTIM change)."""
        level = self.level_triggered()
        self.irr = (self.irr & ~level) | (self.line_levels & level)

    # --- priority resolution ----------------------------------------------------------------

    def highest_request(self) -> int | None:
        """The IR whose request would be signalled on INT now, if any."""
        requests = self.irr & ~self.imr
        if not requests:
            return None
        blocking = self.isr
        if self.is_master and self.special_fully_nested:
            blocking &= ~(1 << self.cascade_id)  # the slave may interrupt its own service routine
        for ir in _priority_order(self.priority_base):
            bit = 1 << ir
            if self.special_mask:
                # Special mask mode: every unmasked level that is not itself in service is enabled.
                if requests & bit and not self.isr & bit:
                    return ir
                continue
            if blocking & bit:
                return None  # everything from here on has lower priority than what is in service
            if requests & bit:
                return ir
        return None

    def highest_in_service(self) -> int | None:
        for ir in _priority_order(self.priority_base):
            if self.isr & (1 << ir):
                return ir
        return None

    def take(self, ir: int) -> None:
        """The INTA cycle for `ir`: request becomes in-service."""
        bit = 1 << ir
        if not self.level_triggered() & bit and not (self.is_master and ir == self.cascade_id and not self.single):
            self.irr &= ~bit  # edge request consumed; level ones and the cascade input follow their line
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_base = (ir + 1) & 7
        else:
            self.isr |= bit

    # --- command port -----------------------------------------------------------------------

    def write_command(self, value: int) -> None:
        if value & ICW1:
            self.write_icw1(value)
        elif value & OCW3:
            self.write_ocw3(value)
        else:
            self.write_ocw2(value)

    def write_icw1(self, value: int) -> None:
        self.irr = 0  # the edge-sense circuit is reset: a new rising edge is needed
        self.isr = 0
        self.imr = 0
        self.priority_base = 0
        self.special_mask = False
        self.read_isr = False
        self.poll_pending = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.icw4_expected = bool(value & ICW1_IC4)
        self.single = bool(value & ICW1_SNGL)
        self.level_mode = bool(value & ICW1_LTIM)
        self.resync_level_inputs()
        self.init_state = INIT_ICW2
        log.debug("pic %s: ICW1 %#04x", self.name, value)

    def write_ocw2(self, value: int) -> None:
        command = value >> 5  # R, SL, EOI
        level = value & 7
        if command == 0b001:  # non-specific EOI
            self._eoi(self.highest_in_service(), rotate=False)
        elif command == 0b011:  # specific EOI
            self._eoi(level, rotate=False)
        elif command == 0b101:  # rotate on non-specific EOI
            self._eoi(self.highest_in_service(), rotate=True)
        elif command == 0b111:  # rotate on specific EOI
            self._eoi(level, rotate=True)
        elif command == 0b100:
            self.rotate_on_auto_eoi = True
        elif command == 0b000:
            self.rotate_on_auto_eoi = False
        elif command == 0b110:  # set priority: `level` becomes lowest
            self.priority_base = (level + 1) & 7
        # 0b010: no operation

    def _eoi(self, ir: int | None, rotate: bool) -> None:
        if ir is None:
            return
        self.isr &= ~(1 << ir)
        if rotate:
            self.priority_base = (ir + 1) & 7

    def write_ocw3(self, value: int) -> None:
        if value & OCW3_POLL:
            self.poll_pending = True
        if value & OCW3_READ_REGISTER:
            self.read_isr = bool(value & OCW3_READ_ISR)
        if value & OCW3_SPECIAL_MASK:
            self.special_mask = bool(value & OCW3_SET_SPECIAL_MASK)

    # --- data port --------------------------------------------------------------------------

    def write_data(self, value: int) -> None:
        state = self.init_state
        if state == INIT_ICW2:
            self.vector_base = value & 0xF8
            if not self.single:
                self.init_state = INIT_ICW3
            elif self.icw4_expected:
                self.init_state = INIT_ICW4
            else:
                self.init_state = INIT_READY
        elif state == INIT_ICW3:
            # Master: bitmask of IRs with slaves; slave: its ID. Only IR2 is wired here.
            if self.is_master:
                if value != 1 << CASCADE_IRQ:
                    log.info("pic %s: ICW3 %#04x names slaves other than on IR2 (only IR2 is wired)", self.name, value)
            else:
                self.cascade_id = value & 7
            self.init_state = INIT_ICW4 if self.icw4_expected else INIT_READY
        elif state == INIT_ICW4:
            if not value & ICW4_UPM:
                log.info("pic %s: ICW4 selects 8080/85 mode; vectors are delivered as in 8086 mode", self.name)
            self.auto_eoi = bool(value & ICW4_AEOI)
            self.special_fully_nested = bool(value & ICW4_SFNM)
            self.init_state = INIT_READY
            log.debug("pic %s: initialized, vectors %#04x-%#04x%s", self.name, self.vector_base,
                      self.vector_base + 7, ", auto-EOI" if self.auto_eoi else "")
        else:
            self.imr = value

    def read_status(self) -> int:
        return self.isr if self.read_isr else self.irr

    # --- snapshot ---------------------------------------------------------------------------

    _FIELDS = ("irr", "isr", "imr", "vector_base", "priority_base", "init_state", "icw4_expected",
               "single", "level_mode", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested",
               "special_mask", "read_isr", "poll_pending", "cascade_id", "elcr", "line_levels")

    def save(self) -> PicChipState:
        return PicChipState(**{name: getattr(self, name) for name in self._FIELDS})

    def check_restorable(self, state: PicChipState) -> None:
        state = require(state, PicChipState)
        if state.elcr & ~self.elcr_mask:
            state.fail("elcr", f"{state.elcr:#x} sets bits outside the {self.name}'s ELCR ({self.elcr_mask:#x})")

    def restore(self, state: PicChipState) -> None:
        for name in self._FIELDS:
            setattr(self, name, getattr(state, name))


class _PortView:
    """A bus device for one of the pair's port ranges."""

    def __init__(self, reader: Callable[[int], int], writer: Callable[[int, int], None], length: int) -> None:
        self._reader = reader
        self._writer = writer
        self.length = length

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._reader(offset + i) if offset + i < self.length else 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            if offset + i < self.length:
                self._writer(offset + i, value)


class Pic8259Pair:
    """Master + slave 8259A as on a PC, with the ELCR."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.master = _Chip("master", True, MASTER_ELCR_MASK)
        self.slave = _Chip("slave", False, SLAVE_ELCR_MASK)
        self.on_wakeup: Callable[[], None] | None = None
        self._output = False
        self.master_ports = _PortView(lambda off: self._read_port(self.master, off),
                                      lambda off, v: self._write_port(self.master, off, v), 2)
        self.slave_ports = _PortView(lambda off: self._read_port(self.slave, off),
                                     lambda off, v: self._write_port(self.slave, off, v), 2)
        self.elcr_ports = _PortView(self._read_elcr, self._write_elcr, 2)

    # --- device side ------------------------------------------------------------------------

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ line `irq` (0-15). IRQ 2 is the cascade and cannot be driven."""
        if not 0 <= irq < 16 or irq == CASCADE_IRQ:
            raise ValueError(f"pic: no ISA input for IRQ {irq}")
        with self._lock:
            if irq < 8:
                self.master.set_input(irq, level)
            else:
                self.slave.set_input(irq - 8, level)
            wake = self._update_locked()
        if wake:
            self._wake(wake)

    # --- CPU side ---------------------------------------------------------------------------

    def interrupt_pending(self) -> bool:
        """The master's INT output: an INTA now would yield a real (non-spurious) vector."""
        with self._lock:
            return self.master.highest_request() is not None

    def pending_vector(self) -> int | None:
        """The vector an INTA now would return, without performing it (None if INT is idle)."""
        master = self.master
        if not master.irr & ~master.imr:
            return None  # (a look, asked between every two slices: a request raised meanwhile wakes the CPU)
        with self._lock:
            ir = self.master.highest_request()
            if ir is None:
                return None
            if ir != self.master.cascade_id or self.master.single:
                return self.master.vector_base | ir
            slave_ir = self.slave.highest_request()
            return self.slave.vector_base | (7 if slave_ir is None else slave_ir)

    def acknowledge(self) -> int:
        """The INTA cycle: the vector to deliver (IR7's vector if the request went away)."""
        with self._lock:
            vector = self._acknowledge_locked()
            self._update_locked()
        return vector

    def _acknowledge_locked(self) -> int:
        master, slave = self.master, self.slave
        ir = master.highest_request()
        if ir is None:
            return master.vector_base | 7  # spurious IRQ 7: ISR untouched
        master.take(ir)
        if ir != master.cascade_id or master.single:
            return master.vector_base | ir
        slave_ir = slave.highest_request()
        if slave_ir is None:
            return slave.vector_base | 7  # spurious IRQ 15 (master's IR2 is in service: Linux EOIs it)
        slave.take(slave_ir)
        return slave.vector_base | slave_ir

    def _poll_locked(self, chip: _Chip) -> int:
        """OCW3 poll: a read that acts as INTA for this chip alone."""
        chip.poll_pending = False
        ir = chip.highest_request()
        if ir is None:
            return 0
        chip.take(ir)
        if chip is self.master and ir == chip.cascade_id and not chip.single:
            slave_ir = self.slave.highest_request()
            if slave_ir is not None:
                self.slave.take(slave_ir)
        return 0x80 | ir

    def _update_locked(self) -> bool:
        """Propagate the slave's INT to master IR2; True if the master's INT just rose."""
        master, slave = self.master, self.slave
        # (no unmasked request: no call, the usual case with the IOAPIC in use and both chips masked)
        slave_int = bool(slave.irr & ~slave.imr) and slave.highest_request() is not None
        bit = 1 << CASCADE_IRQ
        if slave_int:
            master.irr |= bit
            master.line_levels |= bit
        else:
            master.irr &= ~bit
            master.line_levels &= ~bit
        output = bool(master.irr & ~master.imr) and master.highest_request() is not None
        rose = output and not self._output
        self._output = output
        return rose

    def _wake(self, wake: bool) -> None:
        callback = self.on_wakeup
        if wake and callback is not None:
            callback()

    # --- ports ------------------------------------------------------------------------------

    def _read_port(self, chip: _Chip, offset: int) -> int:
        with self._lock:
            if chip.poll_pending:
                value = self._poll_locked(chip)
                self._update_locked()
                return value
            return chip.read_status() if offset == 0 else chip.imr

    def _write_port(self, chip: _Chip, offset: int, value: int) -> None:
        with self._lock:
            if offset == 0:
                chip.write_command(value)
            else:
                chip.write_data(value)
            wake = self._update_locked()
        self._wake(wake)

    def _read_elcr(self, offset: int) -> int:
        with self._lock:
            return (self.master if offset == 0 else self.slave).elcr

    def _write_elcr(self, offset: int, value: int) -> None:
        chip = self.master if offset == 0 else self.slave
        with self._lock:
            chip.elcr = value & chip.elcr_mask
            chip.resync_level_inputs()
            wake = self._update_locked()
        self._wake(wake)

    # --- inspection and lifecycle -----------------------------------------------------------

    @property
    def irr(self) -> int:
        """IRR of both chips as a 16-bit mask (slave in the high byte)."""
        with self._lock:
            return self.slave.irr << 8 | self.master.irr

    @property
    def isr(self) -> int:
        with self._lock:
            return self.slave.isr << 8 | self.master.isr

    @property
    def imr(self) -> int:
        with self._lock:
            return self.slave.imr << 8 | self.master.imr

    def reset(self) -> None:
        """Machine reset: both chips back to power-on state; ELCR and line levels kept."""
        with self._lock:
            self.master.reset()
            self.slave.reset()
            self.master.resync_level_inputs()
            self.slave.resync_level_inputs()
            self._update_locked()

    def save(self) -> PicPairState:
        with self._lock:
            return PicPairState(master=self.master.save(), slave=self.slave.save())

    def check_restorable(self, state: PicPairState) -> None:
        state = require(state, PicPairState)
        self.master.check_restorable(state.master)
        self.slave.check_restorable(state.slave)

    def restore(self, state: PicPairState) -> None:
        """Load both chips (both checked first); the output and wake-up follow the restored registers."""
        self.check_restorable(state)
        with self._lock:
            self.master.restore(state.master)
            self.slave.restore(state.slave)
            wake = self._update_locked()
        self._wake(wake)
