"""virtio-blk (virtio 1.2 section 5.2): a raw image file (or block device) as the guest's disk.

A request is a 16-byte header (type, reserved, sector) at the start of the device-readable
buffers, then data (readable for writes, writable for reads), then one status byte: the
last device-writable byte. Nothing else about the framing is assumed: the header may be
split across descriptors and data may be cut anywhere, so every access goes through the
queue's buffer helpers, and reads and writes go straight between the image and guest RAM
with preadv/pwritev.

Durability follows the spec's rules (5.2.6.2): with FLUSH negotiated and the cache in
writeback mode (the default), a write is stable once a later FLUSH completes, which is an
fdatasync. When the driver did not take FLUSH, or set writethrough through CONFIG_WCE,
writes are synced before they complete (one fdatasync per batch).

The image is locked with flock (exclusive, or shared when read-only) so that two VMs
cannot write it at once.

A rate limit (bytes/s and requests/s, devices/rate_limiter.py) is checked before each request:
one that may not go yet is put back in the ring and the queue is served again when the
refill timer fires (throttle.py). Reads and writes cost their data bytes, every request one op.

A read or write of LARGE_TRANSFER bytes or more moves its data on the VM's transfer threads
when the device has them (`transfers`, host_side.DiskTransfers): the thread that took it (on
the software CPU, the guest's) serves on, and the request completes on the I/O thread once its
data has moved, with the others that ended by then and one interrupt. Everything else, every
request that fails its checks and writes in writethrough mode are served where they were taken.
A reset, save(), close() and a migration's hand-over wait until no transfer moves data; one that
ends after a reset, a restore or close() is dropped (the driver gave it up, the restored queue
hands it out again, or the disk is gone).
"""

from __future__ import annotations

import errno
import functools
import fcntl
import logging
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

from ...memory.guest_memory import GuestMemoryError
from ...persist import State, require
from ..rate_limiter import Clock, RateLimit, RateLimiterState, Timers
from .blk_image import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, UNSUPPORTED_FALLOCATE,
                        VIRTIO_BLK_ID_BYTES, BlockError, default_serial, fallocate, lock_image, open_image)
from .device import VIRTIO_ID_BLOCK, VirtioDevice, VirtioDeviceState
from .host_side import DiskTransfers
from .queue import DescriptorChain, SplitQueue, VirtqueueBroken, buffer_views, read_buffers, write_buffers
from .throttle import Throttle

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# Feature bits (section 5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_GEOMETRY = 1 << 4
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# Request types and status values (section 5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags

# struct virtio_blk_config up to the write-zeroes fields (60 bytes; secure erase is not offered):
# capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
# topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback, unused,
# num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3]
CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
CONFIG_WRITEBACK_OFFSET = 32

MAX_QUEUES = 64
MAX_DISCARD_SECTORS = (1 << 30) >> SECTOR_SHIFT      # 1 GiB per segment
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = (1 << 30) >> SECTOR_SHIFT
MAX_WRITE_ZEROES_SEG = 32
ZERO_CHUNK = 1 << 20

IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

# From this size a transfer's data moves on the transfer threads: handing it over and collecting
# it cost a few tens of microseconds, a 128 KiB copy from the page cache about as much.
LARGE_TRANSFER = 128 << 10


class _Transfer(NamedTuple):
    """A request whose data moves on the transfer threads."""
    generation: int
    queue_index: int
    chain: DescriptorChain
    writing: bool
    length: int


class VirtioBlock(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    quick_queues = True  # reads and writes of an image file (inline_kicks.py bounds a slow one)
    completions_awaited = True  # (a guest at iodepth 1 idles until each one's interrupt)

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, serial: str | None = None,
                 num_queues: int = 1, queue_size: int = 256, rate_limit: RateLimit | None = None,
                 timers: Timers | None = None, clock: Clock = time.monotonic_ns, lock: bool = True,
                 transfers: DiskTransfers | None = None) -> None:
        """`lock=False`: the image is opened without its lock (a migration's destination built
        while the source still holds it); take_back_image() takes it. `transfers`: where large
        reads and writes move their data (module docstring); None: every request where it was taken."""
        path = os.fspath(path)
        if not 1 <= num_queues <= MAX_QUEUES:
            raise BlockError(f"virtio-blk: {num_queues} queues requested, between 1 and {MAX_QUEUES} allowed")
        try:
            SplitQueue(queue_size)
        except ValueError as exc:
            raise BlockError(f"virtio-blk: {exc}") from None
        if queue_size < 4:
            raise BlockError(f"virtio-blk: queue size {queue_size} leaves no room for a request (at least 4)")
        if serial is not None:
            try:
                serial_bytes = serial.encode("ascii")
            except UnicodeEncodeError:
                raise BlockError(f"disk serial {serial!r} is not ASCII") from None
            if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
                raise BlockError(f"disk serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")

        fd = open_image(path, readonly)
        try:
            st = os.fstat(fd)
            if lock:
                lock_image(fd, path, readonly)
            size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for block devices
        except BaseException:
            os.close(fd)
            raise
        self.path, self.readonly, self.fd = path, readonly, fd
        self.capacity = size >> SECTOR_SHIFT
        if size % SECTOR_SIZE:
            log.warning("disk image %s: size %d is not a multiple of %d; the guest sees %d sectors",
                        path, size, SECTOR_SIZE, self.capacity)
        self.serial = default_serial(st) if serial is None else serial_bytes
        self.discard_alignment = max(1, min(st.st_blksize, 1 << 20) // SECTOR_SIZE)

        features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_CONFIG_WCE
        if readonly:
            features |= VIRTIO_BLK_F_RO
        else:
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        if num_queues > 1:
            features |= VIRTIO_BLK_F_MQ
        super().__init__((queue_size,) * num_queues, features)
        self.seg_max = queue_size - 2  # the header and the status take two descriptors

        # State the driver or the host file system can change while running.
        self.writeback = 1
        self.write_zeroes_may_unmap = 1
        self._punch_supported = True
        self._zero_range_supported = True

        self.counters = dict.fromkeys(
            ("reads", "writes", "bytes_read", "bytes_written", "flushes", "discards", "write_zeroes", "errors"), 0)
        self._warned: set[str] = set()
        self._zeroes: bytes | None = None
        self.transfers = transfers
        self._transfers_out = 0  # started and not yet back through _transfers_ended
        self.threaded_transfers = 0  # requests whose data moved on the threads (stats, not state)
        self._generation = 0     # a reset, restore or close: transfers that end after it are dropped
        try:
            self.throttle = Throttle(self.lock, self._resume_throttled, timers, rate_limit, clock)
        except BaseException:
            self.close()
            raise

    # --- configuration space ---------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return CONFIG.pack(
            self.capacity, 0, self.seg_max, 0, 0, 0, SECTOR_SIZE, 0, 0, 0, 0, self.writeback, len(self.queues),
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, self.discard_alignment,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, self.write_zeroes_may_unmap)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only the writeback byte is writable, and only once CONFIG_WCE is negotiated (5.2.5).
        with self.lock:
            if offset != CONFIG_WRITEBACK_OFFSET or len(data) != 1 or not self.has_feature(VIRTIO_BLK_F_CONFIG_WCE) \
                    or data[0] > 1:
                log.debug("%s: ignored config write of %d bytes at %#x", self.name, len(data), offset)
                return
            if self.writeback and not data[0] and not self.readonly:
                try:  # writes the guest already completed become stable too
                    os.fdatasync(self.fd)
                except OSError as exc:
                    self._host_error("flush", exc)
            self.writeback = data[0]

    def _writethrough(self) -> bool:
        if self.has_feature(VIRTIO_BLK_F_CONFIG_WCE):
            return not self.writeback
        return not self.has_feature(VIRTIO_BLK_F_FLUSH)

    # --- requests ------------------------------------------------------------------------------------------

    def process_queue(self, queue_index: int) -> None:
        # requests added while this runs are taken without a kick
        self.serve_without_kicks(queue_index, functools.partial(self._serve_batch, self.queues[queue_index]),
                                 lambda: self.throttle.blocked)

    def _serve_batch(self, queue: SplitQueue) -> bool:
        """Execute up to a queue's worth of requests; whether that took all there was."""
        throttle = self.throttle
        batch: list[tuple[DescriptorChain, int | None, bool]] = []
        taken = 0
        while taken < queue.size and (chain := queue.pop()) is not None:
            header = self._header(chain)
            if not throttle.admit(*self._cost(chain, header)):
                queue.undo_pop(chain)  # served when the refill timer fires
                break
            taken += 1
            if not self._hand_over(queue, chain, header):
                batch.append((chain, *self._execute(chain, header)))
        self._complete(queue, batch)
        return taken < queue.size

    def _header(self, chain: DescriptorChain) -> tuple[int, int] | None:
        """(type, sector) from the request's 16-byte header, read once; None when it is shorter."""
        readable = chain.readable
        if readable and readable[0][1] >= HEADER.size:  # Linux's layout: the header in one buffer
            data: bytes | memoryview = self.memory.view(readable[0][0], HEADER.size)
        elif len(data := read_buffers(self.memory, readable, 0, HEADER.size)) < HEADER.size:
            return None
        request_type, _, sector = HEADER.unpack(data)
        return request_type, sector

    @staticmethod
    def _cost(chain: DescriptorChain, header: tuple[int, int] | None) -> tuple[int, int]:
        """(data bytes, operations) a request costs: reads and writes their data, anything else nothing."""
        if header is not None:
            request_type = header[0]
            if request_type == VIRTIO_BLK_T_IN:
                return max(chain.writable_length - 1, 0), 1
            if request_type == VIRTIO_BLK_T_OUT:
                return max(chain.readable_length - HEADER.size, 0), 1
        return 0, 1

    def _resume_throttled(self) -> None:
        """The refill timer fired (device lock held): serve what the limit held back."""
        for index in range(len(self.queues)):
            self.notify(index)

    def set_rate_limit(self, limit: RateLimit | None) -> None:
        """Change the limit while running (buckets start full); None removes it."""
        self.throttle.set_limit(limit)

    def _complete(self, queue, batch: list[tuple[DescriptorChain, int | None, bool]]) -> None:
        """Write the status bytes and return the requests; writethrough writes are synced first."""
        synced = True
        if any(needs_sync for _, status, needs_sync in batch if status == VIRTIO_BLK_S_OK):
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                self._host_error("flush", exc)
                synced = False
        for chain, status, needs_sync in batch:
            if needs_sync and status == VIRTIO_BLK_S_OK and not synced:
                status = VIRTIO_BLK_S_IOERR
            if status != VIRTIO_BLK_S_OK:
                self.counters["errors"] += 1  # requests the guest sees fail (or that are dropped)
            if status is None:
                queue.push(chain, 0)
                continue
            address, length = chain.writable[-1]  # the last writable byte (empty buffers are not listed)
            self.memory.write_u8(address + length - 1, status)
            # The whole writable part: push() reports that span to the software CPU, status byte included.
            queue.push(chain, chain.writable_length)

    def _execute(self, chain: DescriptorChain, header: tuple[int, int] | None) -> tuple[int | None, bool]:
        """Carry out one request: (status or None to drop it, whether it wrote and needs a writethrough sync)."""
        if chain.writable_length == 0:
            self._guest_error("request without a writable status byte dropped")
            return None, False
        if header is None:
            return self._fail("request shorter than its 16-byte header"), False
        request_type, sector = header
        if request_type == VIRTIO_BLK_T_IN:
            return self._read(chain, sector), False
        if request_type == VIRTIO_BLK_T_OUT:
            status = self._write(chain, sector)
        elif request_type == VIRTIO_BLK_T_FLUSH:
            return self._flush(), False
        elif request_type == VIRTIO_BLK_T_GET_ID:
            return self._get_id(chain), False
        elif request_type in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            status = self._discard_or_zero(chain, request_type)
        else:
            self._guest_error(f"unsupported request type {request_type}")
            return VIRTIO_BLK_S_UNSUPP, False
        return status, status == VIRTIO_BLK_S_OK and self._writethrough()

    def _in_range(self, sector: int, length: int) -> bool:
        return (length % SECTOR_SIZE == 0 and sector <= self.capacity
                and length >> SECTOR_SHIFT <= self.capacity - sector)

    @staticmethod
    def _data(chain: DescriptorChain, writing: bool) -> tuple[list[tuple[int, int]], int, int]:
        """Where a read's or a write's data is: (the buffers, the bytes of them before it, its length)."""
        if writing:
            return chain.readable, HEADER.size, chain.readable_length - HEADER.size
        return chain.writable, 0, chain.writable_length - 1  # (the last writable byte is the status)

    def _count(self, writing: bool, length: int) -> None:
        self.counters["writes" if writing else "reads"] += 1
        self.counters["bytes_written" if writing else "bytes_read"] += length

    def _read(self, chain: DescriptorChain, sector: int) -> int:
        buffers, skip, length = self._data(chain, False)
        if not self._in_range(sector, length):
            return self._fail(f"read of {length} bytes at sector {sector} is outside the disk or not whole sectors")
        try:
            self._transfer(os.preadv, buffer_views(self.memory, buffers, skip, length), sector << SECTOR_SHIFT)
        except OSError as exc:
            return self._host_error("read", exc)
        self._count(False, length)
        return VIRTIO_BLK_S_OK

    def _write(self, chain: DescriptorChain, sector: int) -> int:
        if self.readonly:
            return self._fail("write to a read-only disk")
        buffers, skip, length = self._data(chain, True)
        if not self._in_range(sector, length):
            return self._fail(f"write of {length} bytes at sector {sector} is outside the disk or not whole sectors")
        try:
            self._transfer(os.pwritev, buffer_views(self.memory, buffers, skip, length), sector << SECTOR_SHIFT)
        except OSError as exc:
            return self._host_error("write", exc)
        self._count(True, length)
        return VIRTIO_BLK_S_OK

    def _transfer(self, op, views: list[memoryview], offset: int) -> None:
        """preadv/pwritev until every byte has moved: the kernel may stop short, and takes IOV_MAX buffers at most."""
        i = 0
        while i < len(views):
            done = op(self.fd, views[i:i + IOV_MAX], offset)
            if done == 0:
                raise OSError(errno.EIO, "the image ended early (was it truncated?)")
            offset += done
            while done:
                if done >= len(views[i]):
                    done -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][done:]
                    done = 0

    # --- large transfers on the transfer threads ----------------------------------------------------------

    def _hand_over(self, queue: SplitQueue, chain: DescriptorChain, header: tuple[int, int] | None) -> bool:
        """A large read, or a large write in writeback mode, that passes its checks moves its data
        on the transfer threads (True); anything else is for _execute (False)."""
        if self.transfers is None or header is None or chain.writable_length == 0:
            return False
        request_type, sector = header
        writing = request_type == VIRTIO_BLK_T_OUT
        if not writing and request_type != VIRTIO_BLK_T_IN:
            return False
        buffers, skip, length = self._data(chain, writing)
        if length < LARGE_TRANSFER or not self._in_range(sector, length) or \
                writing and (self.readonly or self._writethrough()):
            return False
        item = _Transfer(self._generation, self.queues.index(queue), chain, writing, length)
        self.transfers.start(self._transfers_ended, item, writing, self.fd, sector << SECTOR_SHIFT, self.memory,
                             buffers, skip, length)
        self._transfers_out += 1
        self.threaded_transfers += 1
        return True

    def _transfers_ended(self, ended: list[tuple[object, int]]) -> None:
        """On the I/O thread: complete the requests whose data moved, one interrupt per queue."""
        with self.lock:
            self._transfers_out -= len(ended)
            batches: dict[int, list[tuple[DescriptorChain, int | None, bool]]] = {}
            for item, error in ended:
                assert isinstance(item, _Transfer)
                generation, queue_index, chain, writing, length = item
                if generation != self._generation or not self.queue_usable(queue_index):
                    continue  # reset or restored since (or broken): the driver gets nothing back
                if error:
                    status = self._host_error("write" if writing else "read", OSError(error, os.strerror(error)))
                else:
                    status = VIRTIO_BLK_S_OK
                    self._count(writing, length)
                needs_sync = writing and status == VIRTIO_BLK_S_OK and self._writethrough()  # (switched meanwhile)
                batches.setdefault(queue_index, []).append((chain, status, needs_sync))
            try:
                for queue_index, batch in batches.items():
                    self._complete(self.queues[queue_index], batch)
                    self.signal_used(queue_index)
            except (VirtqueueBroken, GuestMemoryError) as exc:
                self.fail(str(exc))

    def _wait_for_transfers(self) -> None:
        """Return once none of the transfers started moves data (their ends come later)."""
        if self._transfers_out and self.transfers is not None:
            self.transfers.wait_idle()

    def _forget_transfers(self) -> None:
        """A reset, a restore, close(): no data moves after it, and the ends still to come are dropped."""
        self._wait_for_transfers()
        self._generation += 1

    def _flush(self) -> int:
        if not self.readonly:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                return self._host_error("flush", exc)
        self.counters["flushes"] += 1
        return VIRTIO_BLK_S_OK

    def _get_id(self, chain: DescriptorChain) -> int:
        length = min(chain.writable_length - 1, VIRTIO_BLK_ID_BYTES)
        if length <= 0:
            return self._fail("GET_ID without room for the serial")
        write_buffers(self.memory, chain.writable, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:length])
        return VIRTIO_BLK_S_OK

    def _discard_or_zero(self, chain: DescriptorChain, request_type: int) -> int:
        discard = request_type == VIRTIO_BLK_T_DISCARD
        what = "discard" if discard else "write-zeroes"
        if self.readonly:
            return self._fail(f"{what} on a read-only disk")
        length = chain.readable_length - HEADER.size
        max_seg, max_sectors = (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS) if discard else \
            (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
        if length <= 0 or length % SEGMENT.size or length // SEGMENT.size > max_seg:
            return self._fail(f"{what} with {length} bytes of segments (16 each, 1 to {max_seg})")
        data = read_buffers(self.memory, chain.readable, HEADER.size, length)
        segments = [SEGMENT.unpack_from(data, at) for at in range(0, length, SEGMENT.size)]
        allowed_flags = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        if any(flags & ~allowed_flags for _, _, flags in segments):
            # 5.2.6.2: unknown flags, and unmap on a discard, are UNSUPP
            self._guest_error(f"{what} with unsupported flags")
            return VIRTIO_BLK_S_UNSUPP
        for sector, count, _ in segments:
            if count > max_sectors or not self._in_range(sector, count << SECTOR_SHIFT):
                return self._fail(f"{what} of {count} sectors at sector {sector} is outside the disk or too long")
        try:
            for sector, count, flags in segments:
                offset, size = sector << SECTOR_SHIFT, count << SECTOR_SHIFT
                if size == 0:
                    continue
                if discard:
                    self._punch_hole(offset, size)  # advisory: nothing to do where holes are unsupported
                elif not (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP and self.write_zeroes_may_unmap
                          and self._punch_hole(offset, size)):
                    self._zero(offset, size)
        except OSError as exc:
            return self._host_error(what, exc)
        self.counters["discards" if discard else "write_zeroes"] += 1
        return VIRTIO_BLK_S_OK

    def _punch_hole(self, offset: int, size: int) -> bool:
        """Deallocate a range (it reads back as zeroes); False where the file system cannot."""
        if not self._punch_supported:
            return False
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size)
            return True
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_FALLOCATE:
                raise
        log.info("disk image %s: the host cannot punch holes (discard is a no-op, write-zeroes writes)", self.path)
        self._punch_supported = False
        if self.write_zeroes_may_unmap:
            self.write_zeroes_may_unmap = 0
            self.config_changed()  # 5.2.6.2: the device SHOULD tell the driver when this field changes
        return False

    def _zero(self, offset: int, size: int) -> None:
        if self._zero_range_supported:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, size)
                return
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_FALLOCATE:
                    raise
                self._zero_range_supported = False
        if self._zeroes is None:
            self._zeroes = bytes(ZERO_CHUNK)
        end = offset + size
        while offset < end:
            done = os.pwrite(self.fd, memoryview(self._zeroes)[:min(ZERO_CHUNK, end - offset)], offset)
            if done == 0:
                raise OSError(errno.EIO, "the image ended early (was it truncated?)")
            offset += done

    # --- errors --------------------------------------------------------------------------------------------

    def _fail(self, reason: str) -> int:
        self._guest_error(reason)
        return VIRTIO_BLK_S_IOERR

    def _guest_error(self, reason: str) -> None:
        # A guest can repeat a bad request forever: warn about each kind once.
        kind = re.sub(r"\d+", "N", reason)
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s: %s", self.name, reason)
        else:
            log.debug("%s: %s", self.name, reason)

    def _host_error(self, operation: str, exc: OSError) -> int:
        key = f"host {operation} {exc.errno}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning("disk image %s: %s failed: %s (the guest sees an I/O error)", self.path, operation,
                        exc.strerror or exc)
        else:
            log.debug("disk image %s: %s failed: %s", self.path, operation, exc.strerror or exc)
        return VIRTIO_BLK_S_IOERR

    # --- lifecycle and metrics -----------------------------------------------------------------------------

    def on_reset(self) -> None:
        self._forget_transfers()
        self.writeback = 1  # the next driver starts from the default cache mode
        self.throttle.cancel()

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {**self.counters, "throttled": self.throttle.deferrals, "threaded": self.threaded_transfers}

    def hand_over_image(self) -> None:
        """For a live migration's last step (the VM paused): everything written is on the
        image and its lock is released, so the destination's VM can open it; the image stays
        open here. take_back_image() undoes it if the migration fails."""
        with self.lock:
            if self.fd >= 0:
                self._wait_for_transfers()
                if not self.readonly:
                    os.fsync(self.fd)
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def take_back_image(self) -> None:
        """The image's lock again (BlockError if another VM holds it meanwhile)."""
        with self.lock:
            if self.fd >= 0:
                lock_image(self.fd, self.path, self.readonly)

    def close(self) -> None:
        """Release the image and its lock."""
        with self.lock:
            if self.fd >= 0:
                self._forget_transfers()  # (an unplugged disk's late ends touch no guest RAM)
                os.close(self.fd)
                self.fd = -1

    def save(self) -> BlockState:
        """A request is served whole under the device lock, or its data has moved on the transfer
        threads before the save (it is saved in flight and done again after a restore; one a rate
        limit holds back is still in the ring); the limit and its buckets' levels are saved."""
        with self.lock:
            self._wait_for_transfers()
            return BlockState(virtio=self.save_virtio(), capacity=self.capacity, writeback=self.writeback,
                              write_zeroes_may_unmap=self.write_zeroes_may_unmap, counters=dict(self.counters),
                              rate_limiter=self.throttle.save())

    def check_restorable(self, state: State) -> None:
        state = require(state, BlockState)
        if state.capacity != self.capacity:
            state.fail("capacity", f"{state.capacity} sectors, disk image {self.path} has {self.capacity}")
        if set(state.counters) != set(self.counters):
            state.fail("counters", f"names {sorted(state.counters)}, expected {sorted(self.counters)}")
        self.check_virtio(state.virtio)   # features: a read-only disk does not offer the write ones

    def restore(self, state: BlockState) -> None:  # type: ignore[override]
        self.check_restorable(state)
        with self.lock:
            self._forget_transfers()
            self.restore_virtio(state.virtio)
            self.writeback = state.writeback
            self.write_zeroes_may_unmap = state.write_zeroes_may_unmap
            self.counters.update(state.counters)
            self.throttle.restore(state.rate_limiter, resume=self.active)


@dataclass(frozen=True)
class BlockState(State):
    """The virtio state, the disk's size (checked against the image restored with), the cache
    mode the driver chose, whether write-zeroes may unmap, the request counters and (version 2)
    the rate limit with its buckets' levels."""
    KIND = "virtio_blk"
    VERSION = 2
    virtio: VirtioDeviceState
    capacity: int
    writeback: int
    write_zeroes_may_unmap: int
    counters: dict[str, int]
    rate_limiter: RateLimiterState | None = None

    @classmethod
    def upgrade(cls, version: int, fields: dict) -> dict:
        if version == 1:
            return {**fields, "rate_limiter": None}
        return super().upgrade(version, fields)

    def validate(self) -> None:
        self.check_range("capacity", 0, (1 << 64) - 1)
        self.check_range("writeback", 0, 1)
        self.check_range("write_zeroes_may_unmap", 0, 1)
        for name, value in self.counters.items():
            if value < 0:
                self.fail(f"counters[{name!r}]", f"{value} is negative")
