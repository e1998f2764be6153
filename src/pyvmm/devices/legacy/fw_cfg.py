"""QEMU's firmware configuration device (fw_cfg), its traditional interface, for test kernels.

Test kernels written for QEMU ask fw_cfg how many CPUs and how much RAM the machine has
(QEMU's docs/specs/fw_cfg.rst). pyvmm offers it with `--test-devices` (a definition's
`pyvmm.test_devices`), at QEMU's x86 ports:

    0x510  selector, 16-bit write: selects an item and rewinds its data to the first byte
    0x511  data, 8-bit read: the selected item's next byte; 0 past its end or for an unknown key

Items (all little endian):
    0x00 signature   "QEMU"
    0x01 id          32-bit feature bits: 1 (the traditional interface; no DMA)
    0x03 RAM size    64-bit, bytes
    0x05 CPU count   16-bit, the vCPUs at boot
    0x0f max CPUs    16-bit, the vCPUs the machine may have (CPU hotplug)

Writes to the data register are ignored, as QEMU ignores them for these items; the selector
reads as all-ones (it is write-only). `FwCfg` is the device's logic (select, read bytes),
independent of how it is reached; `FwCfgPorts` is its x86 port-I/O face.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ...persist import State

PORT, PORT_COUNT = 0x510, 2          # selector at +0, data at +1
SELECTOR_OFFSET, DATA_OFFSET = 0, 1
KEY_SIGNATURE, KEY_ID, KEY_RAM_SIZE, KEY_NB_CPUS, KEY_MAX_CPUS = 0x00, 0x01, 0x03, 0x05, 0x0F
WRITE_CHANNEL = 0x4000               # selector bit 14: "this item will be written" (ignored here)
ID_TRADITIONAL = 1 << 0
SIGNATURE = b"QEMU"
MAX_OFFSET = 0xFFFF_FFFF             # the read position saturates: reads past an item's end read 0


def machine_items(ram_bytes: int, cpus: int, max_cpus: int) -> dict[int, bytes]:
    """The items a pyvmm machine offers (see the module docstring)."""
    return {KEY_SIGNATURE: SIGNATURE, KEY_ID: ID_TRADITIONAL.to_bytes(4, "little"),
            KEY_RAM_SIZE: ram_bytes.to_bytes(8, "little"), KEY_NB_CPUS: cpus.to_bytes(2, "little"),
            KEY_MAX_CPUS: max_cpus.to_bytes(2, "little")}


class FwCfg:
    """A set of read-only items and a cursor: the selected key and the offset in its data."""

    def __init__(self, items: dict[int, bytes]) -> None:
        self._items = dict(items)
        self._lock = threading.Lock()
        self.selector = KEY_SIGNATURE
        self.offset = 0

    def select(self, key: int) -> None:
        with self._lock:
            self.selector, self.offset = key & 0xFFFF, 0

    def read_data(self, count: int) -> bytes:
        """The next `count` bytes of the selected item (0 past its end)."""
        with self._lock:
            item = self._items.get(self.selector & ~WRITE_CHANNEL, b"")
            chunk = item[self.offset:self.offset + count]
            self.offset = min(self.offset + count, MAX_OFFSET)
        return chunk.ljust(count, b"\0")

    def save(self) -> FwCfgState:
        with self._lock:
            return FwCfgState(selector=self.selector, offset=self.offset)

    def restore(self, state: FwCfgState) -> None:
        with self._lock:
            self.selector, self.offset = state.selector, state.offset


class FwCfgPorts:
    """fw_cfg at PORT (length PORT_COUNT): a 16-bit selector write at +0, data reads at +1."""

    def __init__(self, device: FwCfg) -> None:
        self.device = device

    def read(self, offset: int, size: int) -> bytes:
        if offset == DATA_OFFSET:
            return self.device.read_data(size)
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == SELECTOR_OFFSET and len(data) == 2:
            self.device.select(int.from_bytes(data, "little"))

    def save(self) -> FwCfgState:
        return self.device.save()

    def restore(self, state: FwCfgState) -> None:
        self.device.restore(state)


@dataclass(frozen=True)
class FwCfgState(State):
    """The cursor only: the items come from the machine's definition, which a snapshot keeps."""
    KIND = "fw_cfg"
    selector: int
    offset: int

    def validate(self) -> None:
        self.check_range("selector", 0, 0xFFFF)
        self.check_range("offset", 0, MAX_OFFSET)
