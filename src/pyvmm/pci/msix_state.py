"""MSI-X's saved state (a module of its own: MSI-X is compiled, see pyvmm/compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..persist import State

ENTRY_SIZE: Final = 16  # bytes per MSI-X table entry: address low, high, data, vector control


@dataclass(frozen=True)
class MsixState(State):
    """The MSI-X table (address, data, mask per vector) and the pending bits (the PBA)."""
    KIND = "pci_msix"
    table: bytes
    pending: int

    def validate(self) -> None:
        if len(self.table) % ENTRY_SIZE:
            self.fail("table", f"{len(self.table)} bytes is not whole {ENTRY_SIZE}-byte entries")
        if self.pending < 0:
            self.fail("pending", "is negative")
