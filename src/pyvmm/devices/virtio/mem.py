"""virtio-mem (virtio 1.2 section 5.15): a region of guest-physical memory the guest plugs and
unplugs block by block, up to the size the host asks for.

The host sets `requested_size` (a config-change interrupt); the driver plugs blocks until
`plugged_size` reaches it, or unplugs until it falls to it. The region is part of guest memory
(the builder maps it whole: a KVM memory slot, the software CPU's mapping), and an unplugged
block holds no host memory: it is discarded when unplugged (GuestMemory.discard), so it reads
as zeroes and costs nothing until plugged and touched again. One queue (guestreq), requests:

    PLUG / UNPLUG addr, nb_blocks   ACK; NACK when plugging would exceed requested_size;
                                    ERROR for a range outside the usable region, misaligned,
                                    or not all in the other state
    UNPLUG_ALL                      ACK (everything discarded)
    STATE addr, nb_blocks           PLUGGED, UNPLUGGED or MIXED

The state carries the plugged blocks (a bitmap), requested_size and the usable size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...persist import State, require
from .device import VirtioDevice, VirtioDeviceState
from .queue import read_buffers, write_buffers

VIRTIO_ID_MEM = 24
QUEUE_SIZE = 128
F_ACPI_PXM = 1 << 0  # node_id names an ACPI proximity domain

REQ_PLUG, REQ_UNPLUG, REQ_UNPLUG_ALL, REQ_STATE = 0, 1, 2, 3
RESP_ACK, RESP_NACK, RESP_BUSY, RESP_ERROR = 0, 1, 2, 3
STATE_PLUGGED, STATE_UNPLUGGED, STATE_MIXED = 0, 1, 2

# struct virtio_mem_config: block_size, node_id, padding[6], addr, region_size,
# usable_region_size, plugged_size, requested_size
_CONFIG = struct.Struct("<QH6xQQQQQ")
_REQUEST = struct.Struct("<H6xQH6x")   # type, padding[3], addr, nb_blocks, padding[3]
_RESPONSE = struct.Struct("<H6xH")     # type, padding[3], state


class VirtioMem(VirtioDevice):
    device_id = VIRTIO_ID_MEM
    name = "virtio-mem"

    def __init__(self, address: int, region_size: int, block_size: int, *, node: int | None = None) -> None:
        if block_size <= 0 or block_size & (block_size - 1) or region_size % block_size or address % block_size:
            raise ValueError("the region must be whole, aligned blocks of a power-of-two size")
        super().__init__((QUEUE_SIZE,), F_ACPI_PXM if node is not None else 0)
        self.address, self.region_size, self.block_size = address, region_size, block_size
        self.node = node or 0
        self.plugged = bytearray(region_size // block_size)  # 1 per plugged block
        self.requested_size = 0
        self.usable_region_size = region_size
        self.tally = {"plugged_blocks": 0, "unplugged_blocks": 0, "nacks": 0, "errors": 0}

    @property
    def plugged_size(self) -> int:
        return sum(self.plugged) * self.block_size

    # --- the host's side ------------------------------------------------------------------------------

    def set_requested_size(self, size: int) -> None:
        """Ask the driver to plug or unplug blocks until `size` bytes are plugged."""
        if not 0 <= size <= self.region_size or size % self.block_size:
            raise ValueError(f"the requested size must be whole {self.block_size >> 20} MiB blocks within "
                             f"the {self.region_size >> 20} MiB region")
        with self.lock:
            self.requested_size = size
        self.config_changed()

    def status(self) -> dict[str, int]:
        with self.lock:
            return {"address": self.address, "region_size": self.region_size, "block_size": self.block_size,
                    "usable_region_size": self.usable_region_size, "requested_size": self.requested_size,
                    "plugged_size": self.plugged_size}

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {**self.tally, "plugged_size": self.plugged_size, "requested_size": self.requested_size}

    # --- the guest's requests -------------------------------------------------------------------------

    def process_queue(self, queue_index: int) -> None:
        queue = self.queues[0]
        while (chain := queue.pop()) is not None:
            request = read_buffers(self.memory, chain.readable, 0, _REQUEST.size)
            if len(request) < _REQUEST.size or chain.writable_length < _RESPONSE.size:
                queue.push(chain, 0)  # no request to read or no room for the answer
                continue
            kind, address, blocks = _REQUEST.unpack(request)
            answer, state = self._serve(kind, address, blocks)
            if answer == RESP_NACK:
                self.tally["nacks"] += 1
            elif answer == RESP_ERROR:
                self.tally["errors"] += 1
            queue.push(chain, write_buffers(self.memory, chain.writable, _RESPONSE.pack(answer, state)))
        self.signal_used(0)

    def _serve(self, kind: int, address: int, blocks: int) -> tuple[int, int]:
        if kind == REQ_UNPLUG_ALL:
            self._unplug(0, len(self.plugged))
            self.memory.discard(self.address, self.region_size)  # also what a driver touched unplugged
            return RESP_ACK, 0
        if kind not in (REQ_PLUG, REQ_UNPLUG, REQ_STATE):
            return RESP_ERROR, 0
        first = self._block_range(address, blocks, usable=kind == REQ_PLUG)
        if first is None:
            return RESP_ERROR, 0
        states = set(self.plugged[first:first + blocks])
        if kind == REQ_STATE:
            return RESP_ACK, STATE_MIXED if len(states) > 1 else STATE_PLUGGED if 1 in states else STATE_UNPLUGGED
        if kind == REQ_PLUG:
            if states != {0}:
                return RESP_ERROR, 0
            if self.plugged_size + blocks * self.block_size > self.requested_size:
                return RESP_NACK, 0
            self.plugged[first:first + blocks] = b"\1" * blocks
            self.tally["plugged_blocks"] += blocks
            return RESP_ACK, 0
        if states != {1}:
            return RESP_ERROR, 0
        self._unplug(first, blocks)
        return RESP_ACK, 0

    def _block_range(self, address: int, blocks: int, *, usable: bool) -> int | None:
        """The first block's index of a valid range, or None."""
        limit = self.usable_region_size if usable else self.region_size
        offset = address - self.address
        if blocks <= 0 or offset < 0 or offset % self.block_size or offset + blocks * self.block_size > limit:
            return None
        return offset // self.block_size

    def _unplug(self, first: int, blocks: int) -> None:
        """Unplugged blocks go back to the host (their contents are gone, as the spec allows)."""
        for index in range(first, first + blocks):
            if self.plugged[index]:
                self.plugged[index] = 0
                self.tally["unplugged_blocks"] += 1
                self.memory.discard(self.address + index * self.block_size, self.block_size)

    # --- configuration space and state ----------------------------------------------------------------

    def config_bytes(self) -> bytes:
        with self.lock:
            return _CONFIG.pack(self.block_size, self.node, self.address, self.region_size,
                                self.usable_region_size, self.plugged_size, self.requested_size)

    def save(self) -> VirtioMemState:
        with self.lock:
            return VirtioMemState(virtio=self.save_virtio(), address=self.address, region_size=self.region_size,
                                  block_size=self.block_size, requested_size=self.requested_size,
                                  usable_region_size=self.usable_region_size, plugged=bytes(self.plugged))

    def check_restorable(self, state: State) -> None:
        state = require(state, VirtioMemState)
        self.check_virtio(state.virtio)
        if (state.address, state.region_size, state.block_size) != (self.address, self.region_size, self.block_size):
            raise ValueError(f"virtio-mem state: region {state.address:#x}+{state.region_size:#x} in "
                             f"{state.block_size:#x} blocks, this device's is {self.address:#x}+"
                             f"{self.region_size:#x} in {self.block_size:#x}")

    def restore(self, state: VirtioMemState) -> None:  # type: ignore[override]
        self.check_restorable(state)
        with self.lock:
            self.restore_virtio(state.virtio)
            self.requested_size, self.usable_region_size = state.requested_size, state.usable_region_size
            self.plugged[:] = state.plugged


@dataclass(frozen=True)
class VirtioMemState(State):
    KIND = "virtio_mem"
    virtio: VirtioDeviceState
    address: int
    region_size: int
    block_size: int
    requested_size: int
    usable_region_size: int
    plugged: bytes            # one byte per block: 1 plugged, 0 not

    def validate(self) -> None:
        self.check_range("block_size", 1, 1 << 40)
        if self.region_size % self.block_size or len(self.plugged) != self.region_size // self.block_size:
            self.fail("plugged", f"must hold one byte per block ({self.region_size // self.block_size})")
        if set(self.plugged) - {0, 1}:
            self.fail("plugged", "must hold only 0 and 1")
        for name in ("requested_size", "usable_region_size"):
            self.check_range(name, 0, self.region_size + 1)
