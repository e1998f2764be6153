"""vhost-user-blk: a virtio-blk device whose data plane runs in another process.

pyvmm keeps the transport (registers, feature negotiation, config space) and hands the
rings to a vhost-user back-end (qemu-storage-daemon, SPDK...): the back-end maps guest RAM
through the memfds, reads the rings at the addresses the driver programmed, and is woken
and answers through one kick and one call eventfd per queue. On KVM the kick eventfd is
the queue's ioeventfd (`kick_eventfd(i)`) and the call eventfd an irqfd-backed MSI vector
(`interrupt.queue_eventfd(i)`), so a request never enters Python. Elsewhere notify()
writes the kick eventfd and the I/O thread turns a call into `interrupt.signal_used()`.

The SplitQueue objects only hold what the driver programmed (size, ring addresses,
ready); the back-end walks the rings itself.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from ...iothread import IoThread, make_eventfd
from ...memory.guest_memory import GuestMemoryError
from ...persist import State, StateError, require
from ...vhost_user.frontend import DEFAULT_TIMEOUT, VhostUserFrontend
from ...vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES, MemoryTableEntry, ProtocolFeature, VhostUserError,
)
from .device import (
    COMMON_FEATURES, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VirtioDevice,
    VirtioDeviceState,
)
from .blk import (
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
)
from .queue import DESC_SIZE, ChainError, VirtqueueBroken

log = logging.getLogger(__name__)

# Only features whose config fields lie within CONFIG_SIZE: lifetime, secure erase and zoned
# storage describe fields past it.
BLK_FEATURES = (VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_GEOMETRY | VIRTIO_BLK_F_RO
                | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY | VIRTIO_BLK_F_CONFIG_WCE
                | VIRTIO_BLK_F_MQ | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)

# struct virtio_blk_config up to write_zeroes_may_unmap (+3 padding bytes): what every
# back-end since virtio 1.1 answers; asking for more makes older ones refuse GET_CONFIG.
# Always read from offset 0: libvhost-user back-ends ignore GET_CONFIG's offset.
CONFIG_SIZE = 60
CONFIG_WCE = 32
CONFIG_NUM_QUEUES = 34

WANTED_PROTOCOL_FEATURES = (ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask
                            | ProtocolFeature.CONFIG.mask | ProtocolFeature.RESET_DEVICE.mask)
MAX_QUEUES = 256  # a vring index must fit the 8 bits of SET_VRING_KICK/CALL/ERR

_USED_ELEM = struct.Struct("<II")


class VhostUserBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    name = "vhost-user-blk"

    def __init__(self, socket_path: str | Path, *, iothread: IoThread, num_queues: int = 1,
                 queue_size: int = 128, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise VhostUserError(f"vhost-user-blk: {num_queues} queues requested, 1 to {MAX_QUEUES} possible")
        super().__init__((queue_size,) * num_queues)
        self.socket_path = str(socket_path)
        self.iothread = iothread
        self.frontend = VhostUserFrontend.connect(socket_path, timeout=timeout)
        try:
            self._negotiate(num_queues)
        except BaseException:
            self.frontend.close()
            raise
        self._kick = [make_eventfd() for _ in range(num_queues)]
        self._call = [make_eventfd() for _ in range(num_queues)]
        self._err = [make_eventfd() for _ in range(num_queues)]
        self._started: list[int] = []  # rings the back-end serves (kick fd sent, not stopped since)
        self._closed = False
        iothread.add_reader(self.frontend.fileno(), self._on_socket_readable)
        for index in range(num_queues):
            iothread.add_eventfd(self._call[index], functools.partial(self._on_call, index))
            iothread.add_eventfd(self._err[index], functools.partial(self._on_error, index))

    def _negotiate(self, num_queues: int) -> None:
        frontend, where = self.frontend, f"vhost-user back-end at {self.socket_path}"
        frontend.negotiate(WANTED_PROTOCOL_FEATURES)
        features = frontend.backend_features
        if not features & VIRTIO_F_VERSION_1:
            raise VhostUserError(f"{where} does not offer VIRTIO_F_VERSION_1")
        if not frontend.has_protocol_feature(ProtocolFeature.CONFIG):
            raise VhostUserError(f"{where} cannot report the disk's configuration (no CONFIG protocol feature)")
        backend_queues = frontend.get_queue_num() if frontend.has_protocol_feature(ProtocolFeature.MQ) else 1
        if num_queues > backend_queues or num_queues > 1 and not features & VIRTIO_BLK_F_MQ:
            raise VhostUserError(f"{where} serves {backend_queues} queue(s), {num_queues} requested")
        config = bytearray(frontend.get_config(0, CONFIG_SIZE))
        if features & VIRTIO_BLK_F_MQ:  # the back-end reports its own maximum; the driver must see ours
            struct.pack_into("<H", config, CONFIG_NUM_QUEUES, num_queues)
        self._config = config
        # What our transports and this config layout support; never the vhost-user-only bits
        # (PROTOCOL_FEATURES, LOG_ALL), which mean something else to a guest driver.
        self.offered_features = features & (COMMON_FEATURES | BLK_FEATURES)

    # --- wiring for the builder ---------------------------------------------------------------------

    def kick_eventfd(self, queue_index: int) -> int:
        """The eventfd the back-end waits on for queue `queue_index`: register it as the queue's ioeventfd."""
        return self._kick[queue_index]

    # --- configuration space --------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return bytes(self._config)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset != CONFIG_WCE or len(data) != 1 or not self.has_feature(VIRTIO_BLK_F_CONFIG_WCE):
            log.debug("%s: ignored config write at %#x", self.name, offset)
            return
        try:
            self.frontend.set_config(offset, bytes(data))
        except VhostUserError as exc:
            log.warning("%s: writeback cache setting not applied: %s", self.name, exc)
            return
        self._config[offset] = data[0]

    # --- lifecycle ----------------------------------------------------------------------------------

    def activate(self) -> None:
        """DRIVER_OK: give the back-end the memory table and every ring the driver enabled."""
        with self.lock:
            if self.active or self.broken:
                return
            try:
                self._start_rings()
            except (VirtqueueBroken, VhostUserError, GuestMemoryError) as exc:
                self.fail(str(exc))
                return
            self.active = True
            started = list(self._started)
        for index in started:  # buffers made available before DRIVER_OK
            self.notify(index)

    def _start_rings(self) -> None:
        frontend, memory = self.frontend, self.memory
        ready = [index for index, queue in enumerate(self.queues) if queue.ready]
        event_idx, indirect = self.has_feature(VIRTIO_F_EVENT_IDX), self.has_feature(VIRTIO_F_INDIRECT_DESC)
        for index in ready:  # check every ring before the back-end sees any
            self.queues[index].activate(memory, event_idx=event_idx, indirect=indirect)
        frontend.set_features(self.acked_features | frontend.backend_features & VHOST_USER_F_PROTOCOL_FEATURES)
        frontend.set_mem_table([MemoryTableEntry(r.guest_base, r.size, r.host_address, r.fd)
                                for r in memory.regions])
        queue_eventfd = getattr(self.interrupt, "queue_eventfd", None)
        for index in ready:
            queue = self.queues[index]
            frontend.set_vring_num(index, queue.size)
            frontend.set_vring_base(index, queue.last_avail)
            frontend.set_vring_addr(index, desc=self._host_address(queue.desc_table, DESC_SIZE * queue.size),
                                    used=self._host_address(queue.used_ring, 6 + 8 * queue.size),
                                    avail=self._host_address(queue.avail_ring, 6 + 2 * queue.size))
            call = queue_eventfd(index) if queue_eventfd is not None else None
            frontend.set_vring_call(index, self._call[index] if call is None else call)
            frontend.set_vring_err(index, self._err[index])
            self._started.append(index)  # before the kick fd: a failed ack may still have started it
            frontend.set_vring_kick(index, self._kick[index])
        if frontend.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:  # rings start disabled then
            for index in ready:
                frontend.set_vring_enable(index, True)

    def _host_address(self, address: int, length: int) -> int:
        region = self.memory.region_for(address, length)
        return region.host_address + (address - region.guest_base)

    def on_reset(self) -> None:
        self._stop_rings()

    def _stop_rings(self) -> None:
        started, self._started = self._started, []
        frontend = self.frontend
        if not started or frontend.dead:
            return
        try:
            if frontend.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
                for index in started:
                    frontend.set_vring_enable(index, False)
            for index in started:  # stops the ring; the back-end drops its kick and call fds
                self.queues[index].last_avail = frontend.get_vring_base(index)
            if frontend.has_protocol_feature(ProtocolFeature.RESET_DEVICE):
                frontend.reset_device()
        except VhostUserError as exc:
            log.warning("%s: stopping the back-end's rings failed: %s", self.name, exc)

    def notify(self, queue_index: int) -> None:
        """A kick from the driver: wake the back-end (no lock: an eventfd write is atomic)."""
        if self.active and not self.broken and 0 <= queue_index < len(self._kick):
            os.eventfd_write(self._kick[queue_index], 1)

    # --- I/O thread callbacks ---------------------------------------------------------------------------

    def _on_call(self, index: int) -> None:
        with self.lock:
            if not self.active or index not in self._started:
                return
            if self.memory.on_device_writes is not None:
                self._note_device_writes(index)
        # The back-end already applied EVENT_IDX / NO_INTERRUPT: no needs_interrupt() here.
        self.interrupt.signal_used(index)

    def _note_device_writes(self, index: int) -> None:
        """Tell the software CPU which guest bytes the back-end wrote (it may hold stale translations).

        Reads the used entries since the last call; queue.used_idx mirrors how far we got.
        """
        queue, memory = self.queues[index], self.memory
        note = memory.on_device_writes
        assert note is not None  # _on_call checked
        runs: list[tuple[int, int]] = []
        new = memory.read_u16(queue.used_ring + 2)
        if (new - queue.used_idx) & 0xFFFF > queue.size:  # nonsense index: resynchronise, report nothing
            queue.used_idx = new
            return
        while queue.used_idx != new:
            slot = queue.used_idx % queue.size
            head, written = _USED_ELEM.unpack(memory.view(queue.used_ring + 4 + 8 * slot, 8))
            queue.used_idx = (queue.used_idx + 1) & 0xFFFF
            if not written or head >= queue.size:
                continue
            try:  # the queue's own walker: the same checks as for chains pyvmm serves itself
                chain = queue._walk(head)
            except (ChainError, GuestMemoryError):
                continue
            for address, length in chain.writable:
                runs.append((address, min(length, written)))
                written -= length
                if written <= 0:
                    break
        if runs:
            note(runs)

    def _on_error(self, index: int) -> None:
        if self.active:
            self.fail(f"vhost-user back-end reported an error on queue {index}")

    def _on_socket_readable(self) -> None:
        reason = self.frontend.check_connection()
        if reason is not None:
            self.iothread.remove_reader(self.frontend.fileno())  # level-triggered: it stays readable
            self.fail(reason)

    # --- teardown and snapshots ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching the fds (waiting for the I/O thread to let go of them), then close them."""
        if self._closed:
            return
        self._closed = True
        watched = [self.frontend.fileno(), *self._call, *self._err]
        done = threading.Event()

        def unwatch() -> None:
            for fd in watched:
                self.iothread.remove_reader(fd)
            done.set()

        self.iothread.call_soon(unwatch)
        done.wait(1.0)
        self.frontend.close()
        for fd in (*self._kick, *self._call, *self._err):
            os.close(fd)

    def save(self) -> VhostUserBlkState:
        """What vhost-user lets a front-end save: the rings' positions. Each started ring is
        stopped (GET_VRING_BASE answers the back-end's next available index), its used index is
        read from guest memory, and the ring is started again from there. Requests the back-end
        has taken and not completed cannot be handed over: the save is refused with one line then
        (and the rings keep going). Save while paused."""
        with self.lock:
            if self._started:
                if self.frontend.dead:
                    raise StateError(f"{self.name}: the back-end at {self.socket_path} is gone: "
                                     "its rings' positions cannot be read")
                taken = self._ring_positions()
                if taken:
                    raise StateError(f"{self.name}: the back-end holds {taken} request(s) in flight; vhost-user "
                                     "cannot hand them over (save again once the disk is idle)")
            return VhostUserBlkState(virtio=self.save_virtio(), config=bytes(self._config))

    def _ring_positions(self) -> int:
        """Stop the started rings to read where the back-end stands, start them again; returns how
        many requests it had taken without completing them."""
        frontend, started = self.frontend, list(self._started)
        try:
            if frontend.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
                for index in started:
                    frontend.set_vring_enable(index, False)
            for index in started:
                queue = self.queues[index]
                queue.last_avail = frontend.get_vring_base(index)
                queue.used_idx = self.memory.read_u16(queue.used_ring + 2)
            self._started = []
            self._start_rings()
        except (VhostUserError, VirtqueueBroken, GuestMemoryError) as exc:
            self.fail(str(exc))
            raise StateError(f"{self.name}: reading the back-end's ring positions failed: {exc}") from None
        return sum((self.queues[i].last_avail - self.queues[i].used_idx) & 0xFFFF for i in started)

    def check_restorable(self, state: State) -> None:
        state = require(state, VhostUserBlkState)
        saved, ours = bytearray(state.config), bytearray(self._config)
        if len(saved) == len(ours):
            saved[CONFIG_WCE] = ours[CONFIG_WCE] = 0   # the cache mode is the driver's, restored below
        if saved != ours:
            state.fail("config", f"describes another disk than the back-end at {self.socket_path} serves")
        self.check_virtio(state.virtio)

    def restore(self, state: VhostUserBlkState) -> None:  # type: ignore[override]
        """Load the rings' positions and hand them to the back-end (SET_VRING_BASE) if the device
        was running. A back-end that then fails marks the device for reset, as at DRIVER_OK."""
        self.check_restorable(state)
        with self.lock:
            if self._started:
                self._stop_rings()
            self.restore_virtio(state.virtio)
            if state.config[CONFIG_WCE] != self._config[CONFIG_WCE] and self.has_feature(VIRTIO_BLK_F_CONFIG_WCE):
                self.write_config(CONFIG_WCE, state.config[CONFIG_WCE:CONFIG_WCE + 1])
            if self.active:
                try:
                    self._start_rings()
                except (VirtqueueBroken, VhostUserError, GuestMemoryError) as exc:
                    self.fail(str(exc))


@dataclass(frozen=True)
class VhostUserBlkState(State):
    """The virtio state (ring addresses and the back-end's positions) and the config space the
    driver saw (capacity and limits are checked against the back-end restored with)."""
    KIND = "vhost_user_blk"
    virtio: VirtioDeviceState
    config: bytes

    def validate(self) -> None:
        if len(self.config) != CONFIG_SIZE:
            self.fail("config", f"{len(self.config)} bytes, expected {CONFIG_SIZE}")
