"""MSI-X (PCI Local Bus 3.0, 6.8.2): the capability, the vector table and the pending-bit array.

The capability sits in config space; the table (16 bytes per vector: address low, address
high, data, vector control) and the PBA (one bit per vector) live in one of the device's
BARs at offsets the device chooses. Each table entry is delivered through an `MsiVector`
(made by a factory the root gets from the accelerator): the vector is told its
(address, data, masked) whenever that changes, and `trigger()` sends it.

A vector is masked when MSI-X is disabled, the function mask is set, or its own mask bit
is set. An event on a masked vector (MSI-X enabled) sets its pending bit instead; the bit is
cleared and the message sent when the vector is unmasked.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Callable, Final

from ..bus.interrupt import MsiVector
from ..persist import require
from .config import CAP_ID_MSIX, PciConfigSpace, PciError
from .msix_state import ENTRY_SIZE, MsixState

log = logging.getLogger(__name__)

MAX_VECTORS: Final = 2048
ENTRY_ADDRESS_LO: Final = 0
ENTRY_ADDRESS_HI: Final = 4
ENTRY_DATA: Final = 8
ENTRY_VECTOR_CONTROL: Final = 12
VECTOR_MASKED: Final = 1 << 0

# Message Control, at capability offset 2.
CONTROL: Final = 2
CONTROL_TABLE_SIZE: Final = 0x7FF
CONTROL_FUNCTION_MASK: Final = 1 << 14
CONTROL_ENABLE: Final = 1 << 15
TABLE_OFFSET_BIR: Final = 4
PBA_OFFSET_BIR: Final = 8
BIR_MASK: Final = 0x7
CAPABILITY_SIZE: Final = 12


MsiVectorFactory = Callable[[], MsiVector]


class MsixCapability:
    """MSI-X state of one function: capability registers in `config`, table and PBA here."""

    def __init__(self, config: PciConfigSpace, vectors: int, *, bar: int, table_offset: int, pba_offset: int) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise PciError(f"MSI-X supports 1-{MAX_VECTORS} vectors, got {vectors}")
        if table_offset % 8 or pba_offset % 8:
            raise PciError("MSI-X table and PBA offsets must be 8-byte aligned")
        if not 0 <= bar <= 5:
            raise PciError(f"MSI-X BAR index {bar} out of range 0-5")
        self.config = config
        self.vectors = vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table_size = vectors * ENTRY_SIZE
        self.pba_size = (vectors + 63) // 64 * 8
        if table_offset < pba_offset + self.pba_size and pba_offset < table_offset + self.table_size:
            raise PciError("MSI-X table and PBA overlap")
        body = struct.pack("<HII", vectors - 1, table_offset | bar, pba_offset | bar)
        writable = struct.pack("<HII", CONTROL_ENABLE | CONTROL_FUNCTION_MASK, 0, 0)
        self.offset = config.add_capability(CAP_ID_MSIX, body, writable=writable)
        self._table = bytearray(self.table_size)
        for i in range(vectors):
            self._table[i * ENTRY_SIZE + ENTRY_VECTOR_CONTROL] = VECTOR_MASKED
        self._pending = 0
        self._vectors: list[MsiVector] | None = None
        self._configured: list[tuple[int, int, bool] | None] = [None] * vectors
        self._lock = threading.RLock()

    @property
    def end(self) -> int:
        """Config offset just past the capability."""
        return self.offset + CAPABILITY_SIZE

    # --- delivery -----------------------------------------------------------------------------

    def connect(self, factory: MsiVectorFactory) -> None:
        """Make one MsiVector per table entry and tell each its current state."""
        with self._lock:
            self._vectors = [factory() for _ in range(self.vectors)]
            self._configured = [None] * self.vectors
            self._sync_all()

    @property
    def msi_vectors(self) -> list[MsiVector]:
        """The connected vectors (for a transport wiring eventfds); empty before connect()."""
        return list(self._vectors or ())

    @property
    def control(self) -> int:
        return self.config.get(self.offset + CONTROL, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & CONTROL_FUNCTION_MASK)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, vector mask bit) of a table entry."""
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self._table, vector * ENTRY_SIZE)
        return hi << 32 | lo, data, bool(ctrl & VECTOR_MASKED)

    def is_masked(self, vector: int) -> bool:
        return self._masked(self.control, vector)

    def _masked(self, control: int, vector: int) -> bool:
        return (not control & CONTROL_ENABLE or bool(control & CONTROL_FUNCTION_MASK)
                or self.entry(vector)[2])

    def is_pending(self, vector: int) -> bool:
        return bool(self._pending >> vector & 1)

    def notify(self, vector: int) -> bool:
        """Signal `vector`. False when MSI-X is off (the device should use INTx) or the vector
        does not exist; True when sent or left pending because it is masked."""
        with self._lock:
            control = self.control  # (read once: a device completion comes through here each time)
            if not control & CONTROL_ENABLE or not 0 <= vector < self.vectors:
                return False
            if self._masked(control, vector):
                self._pending |= 1 << vector
                return True
            if self._vectors is not None:
                self._vectors[vector].trigger()
            return True

    def _sync(self, vector: int) -> None:
        """Reconfigure the vector if its effective state changed; send it if it was unmasked
        with its pending bit set."""
        address, data, _ = self.entry(vector)
        masked = self.is_masked(vector)
        state = (address, data, masked)
        if self._vectors is not None and state != self._configured[vector]:
            self._vectors[vector].configure(address, data, masked)
            self._configured[vector] = state
        if not masked and self._pending >> vector & 1 and self._vectors is not None:
            self._pending &= ~(1 << vector)
            self._vectors[vector].trigger()

    def _sync_all(self) -> None:
        for vector in range(self.vectors):
            self._sync(vector)

    def config_written(self, offset: int, length: int) -> None:
        """Called after every guest config write: acts when it touched Message Control."""
        control = self.offset + CONTROL
        if offset < control + 2 and control < offset + length:
            with self._lock:
                self._sync_all()

    # --- table and PBA (accessed through the BAR) ---------------------------------------------

    def in_table(self, offset: int, size: int) -> bool:
        return self.table_offset <= offset and offset + size <= self.table_offset + self.table_size

    def in_pba(self, offset: int, size: int) -> bool:
        return self.pba_offset <= offset and offset + size <= self.pba_offset + self.pba_size

    def table_read(self, offset: int, size: int) -> bytes:
        """`offset` is relative to the table."""
        with self._lock:
            return bytes(self._table[offset:offset + size])

    def table_write(self, offset: int, data: bytes) -> None:
        with self._lock:
            touched = set()
            for i, byte in enumerate(data):
                j = offset + i
                if not 0 <= j < self.table_size:
                    continue
                field = j % ENTRY_SIZE
                if field == ENTRY_VECTOR_CONTROL:
                    byte &= VECTOR_MASKED        # the other control bits are reserved
                elif field > ENTRY_VECTOR_CONTROL:
                    continue
                self._table[j] = byte
                touched.add(j // ENTRY_SIZE)
            for vector in sorted(touched):
                self._sync(vector)

    def pba_read(self, offset: int, size: int) -> bytes:
        """`offset` is relative to the PBA."""
        with self._lock:
            pba = self._pending.to_bytes(self.pba_size, "little")
        return pba[offset:offset + size]

    def pba_write(self, offset: int, data: bytes) -> None:
        """The PBA is read-only; writes are ignored."""

    def close(self) -> None:
        """Release the vectors (their routes and eventfds)."""
        with self._lock:
            vectors, self._vectors = self._vectors or [], None
            self._configured = [None] * self.vectors
        for vector in vectors:
            close = getattr(vector, "close", None)
            if close is not None:
                close()

    # --- snapshots ------------------------------------------------------------------------------

    def save(self) -> MsixState:
        with self._lock:
            return MsixState(table=bytes(self._table), pending=self._pending)

    def check_restorable(self, state: MsixState) -> None:
        state = require(state, MsixState)
        if len(state.table) != self.table_size:
            state.fail("table", f"{len(state.table)} bytes, {self.vectors} vectors take {self.table_size}")
        if state.pending >> self.vectors:
            state.fail("pending", f"{state.pending:#x} has bits beyond {self.vectors} vectors")

    def restore(self, state: MsixState) -> None:
        """Load a save() (the capability registers come back with the config space, restored
        first); the vectors are then reconfigured and pending unmasked ones sent."""
        self.check_restorable(state)
        with self._lock:
            self._table[:] = state.table
            self._pending = state.pending
            self._configured = [None] * self.vectors
            self._sync_all()
