"""virtio-rng (virtio 1.2 section 5.4): fills the guest's buffers with host entropy."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...persist import State, require
from .device import VIRTIO_ID_RNG, VirtioDevice, VirtioDeviceState
from .queue import buffer_views

QUEUE_SIZE = 256
MAX_REQUEST = 64 << 10  # bytes served per request: a guest asking for 4 GiB gets a short read


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    name = "virtio-rng"

    def __init__(self, source=os.urandom) -> None:
        super().__init__((QUEUE_SIZE,))
        self.source = source
        self.bytes_served = 0

    def process_queue(self, queue_index: int) -> None:
        queue = self.queues[0]
        while (chain := queue.pop()) is not None:
            written = 0
            for view in buffer_views(self.memory, chain.writable, 0, min(chain.writable_length, MAX_REQUEST)):
                view[:] = self.source(len(view))
                written += len(view)
            self.bytes_served += written
            queue.push(chain, written)
        self.signal_used(0)

    def save(self) -> RngState:
        with self.lock:
            return RngState(virtio=self.save_virtio(), bytes_served=self.bytes_served)

    def check_restorable(self, state: State) -> None:
        self.check_virtio(require(state, RngState).virtio)

    def restore(self, state: RngState) -> None:  # type: ignore[override]
        self.check_restorable(state)
        with self.lock:
            self.restore_virtio(state.virtio)
            self.bytes_served = state.bytes_served


@dataclass(frozen=True)
class RngState(State):
    KIND = "virtio_rng"
    virtio: VirtioDeviceState
    bytes_served: int

    def validate(self) -> None:
        self.check_range("bytes_served", 0, 1 << 64)
