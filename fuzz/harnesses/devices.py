"""Each virtio device's request parsing: a driver (the input) programs the queues, fills guest
RAM with whatever requests it likes, writes the config space and kicks queues in any order,
while the host side (a fake TAP, vsock peers, console clients) feeds bytes too.

Allowed: anything the device does with a request (fail it, drop it, mark itself for reset).
Not allowed: an exception escaping the device (on a vCPU or the I/O thread it would stop the VM)."""

from __future__ import annotations

import os
import tempfile

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.iothread import IoThread

from .guest import fill, memory, program_queue
from .reader import Reader


class Interrupts:
    def signal_used(self, queue_index: int) -> None:
        pass

    def signal_config(self) -> None:
        pass

    def set_needs_reset(self) -> None:
        pass


class Timers:
    """A rate limiter's timers: the harness fires them itself."""

    def __init__(self) -> None:
        self.pending: list = []

    def call_later(self, delay_ns, callback):
        entry = [callback]
        self.pending.append(entry)

        class Handle:
            def cancel(self) -> None:
                entry[0] = None
        return Handle()

    def fire(self) -> None:
        pending, self.pending = self.pending, []
        for (callback,) in pending:
            if callback is not None:
                callback()


def exercise(device: VirtioDevice, r: Reader, host_step=None) -> None:
    """Program, fill, activate, then a sequence of kicks, config accesses and host events."""
    device.attach(memory(), Interrupts())
    device.set_driver_features(r.u64())
    for queue in device.queues:
        program_queue(queue, r)
    steps = r.take(48)
    fill(memory(), r)
    device.activate()
    for op in steps:
        kind, arg = op & 7, op >> 3
        if kind <= 3:
            device.notify(arg % (len(device.queues) + 1))   # one past the last: an unknown queue
        elif kind == 4:
            device.read_config(arg, r.choice((1, 2, 4, 8)))
        elif kind == 5:
            device.write_config(arg, r.take(r.choice((1, 2, 4, 8))))
        elif kind == 6 and host_step is not None:
            host_step(r)
        elif op == 0xFF:
            device.reset()
            device.set_driver_features(r.u64())
            device.activate()
    device.save()                 # whatever the guest did, the device's state can be saved
    device.reset()


_image: str | None = None


def _disk_image() -> str:
    """512 KiB: room for the large requests that go to the transfer threads (128 KiB and more)."""
    global _image
    if _image is None:
        fd, _image = tempfile.mkstemp(prefix="pyvmm-fuzz-", suffix=".img")
        os.ftruncate(fd, 1024 * 512)
        os.close(fd)
    return _image


class HeldTransfers:
    """host_side.DiskTransfers on the C transfer threads (one for the process) where they are
    built, else moved at once in Python; either way a transfer ends only at a host step, as a
    thread that has not run yet would, so a kick, a reset or a save can come in between."""

    _native = None

    def __init__(self) -> None:
        from pyvmm.compiled import c_module

        module = c_module("pyvmm.host.transfer_threads")
        if module is not None and HeldTransfers._native is None:
            HeldTransfers._native = module.Transfers(1)
        self.native = HeldTransfers._native
        self.ended: list = []   # (finished, item, errno) moved in Python

    def start(self, finished, item, writing, fd, offset, memory, pieces, skip, length) -> None:
        if self.native is not None:
            regions = tuple((int(region.guest_base), region.view) for region in memory.regions)
            self.native.start((finished, item), writing, fd, offset, regions, pieces, skip, length)
            return
        from pyvmm.devices.virtio.queue import buffer_views

        views = buffer_views(memory, pieces, skip, length)
        try:
            (os.pwritev if writing else os.preadv)(fd, views, offset)
            error = 0
        except OSError as exc:
            error = exc.errno or 5
        self.ended.append((finished, item, error))

    def wait_idle(self) -> None:
        if self.native is not None:
            self.native.wait_idle()

    def end(self) -> None:
        """Every transfer started ends now, each device's in one call (the I/O thread's part)."""
        from pyvmm.host.disk_transfers import hand_out

        self.wait_idle()
        ended = [(finished, item, error) for (finished, item), error in self.native.take()] \
            if self.native is not None else []
        ended, self.ended = self.ended + ended, []
        hand_out(ended)


def blk_input(data: bytes) -> None:
    from pyvmm.devices.rate_limiter import RateLimit, TokenBucketConfig
    from pyvmm.devices.virtio.blk import VirtioBlock

    r = Reader(data)
    timers = Timers()
    transfers = HeldTransfers()
    limit = RateLimit(TokenBucketConfig(r.u16() + 1, r.u8() + 1), None) if r.flag() else None
    device = VirtioBlock(_disk_image(), readonly=r.flag(), queue_size=r.choice((4, 8, 16, 256)),
                         num_queues=r.u8() % 2 + 1, rate_limit=limit, timers=timers, transfers=transfers)

    def host_step(r: Reader) -> None:
        timers.fire()
        transfers.end()

    try:
        exercise(device, r, host_step)
    finally:
        device.close()
        transfers.end()   # (dropped: the disk is closed; guest RAM's buffers let go)


class FakeTap:
    """A TAP without a kernel: frames to the guest come from the input, frames from it are kept."""

    def __init__(self, r: Reader) -> None:
        self.r = r
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)   # something the I/O thread can register

    def fileno(self) -> int:
        return self.fd

    def readv(self, buffers: list) -> int:
        if not self.r.left or self.r.u8() < 32:
            raise BlockingIOError
        frame = self.r.take(self.r.u16() % 9000)
        done = 0
        for view in buffers:
            n = min(len(view), len(frame) - done)
            view[:n] = frame[done:done + n]
            done += n
        return len(frame)

    def writev(self, buffers: list) -> int:
        return sum(len(b) for b in buffers)

    def supported_offloads(self) -> int:
        return 0x1F

    def set_offloads(self, flags: int) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


def net_input(data: bytes) -> None:
    from pyvmm.devices.rate_limiter import RateLimit, TokenBucketConfig
    from pyvmm.devices.virtio.net import VirtioNet

    r = Reader(data)
    tap = FakeTap(r)
    io = IoThread(name="fuzz-io")  # never started: its calls run inline
    timers = Timers()
    limit = RateLimit(None, TokenBucketConfig(r.u8() + 1, r.u8() + 1)) if r.flag() else None
    device = VirtioNet(tap, mac=bytes.fromhex("525400123456"), iothread=io, queue_size=r.choice((4, 16, 256)),
                       rx_rate_limit=limit, tx_rate_limit=limit, timers=timers)

    def host(r: Reader) -> None:
        if r.flag():
            timers.fire()
        else:
            device._rx_ready()          # the I/O thread: the TAP is readable
    try:
        exercise(device, r, host)
    finally:
        io.stop()
        tap.close()


class FakeStream:
    def __init__(self, r: Reader) -> None:
        self.r = r

    def recv(self, limit: int):
        if self.r.u8() < 40:
            return None
        return self.r.take(min(limit, self.r.u16() % 2048))

    def send(self, data):
        return None if self.r.u8() < 20 else len(data)

    def shutdown_write(self) -> None:
        pass

    def watch_readable(self, callback) -> None:
        self.readable = callback

    def unwatch_readable(self) -> None:
        pass

    def watch_writable(self, callback) -> None:
        self.writable = callback

    def close(self) -> None:
        pass


class FakeVsockHost:
    def __init__(self, r: Reader) -> None:
        self.r, self.streams, self.on_request = r, {}, None

    def connect(self, host_port: int):
        if self.r.u8() < 40:
            raise ConnectionRefusedError("nobody listens")
        return FakeStream(self.r)

    def start(self, on_request) -> None:
        self.on_request = on_request

    def accepted(self, stream, local_port: int) -> None:
        pass

    def adopt(self, key, stream) -> None:
        self.streams[key] = stream

    def release(self, key) -> None:
        self.streams.pop(key, None)

    def reclaim(self, key):
        return self.streams.get(key)

    def counters(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def vsock_input(data: bytes) -> None:
    from pyvmm.devices.virtio.vsock import VirtioVsock

    r = Reader(data)
    host = FakeVsockHost(r)
    device = VirtioVsock(3 + r.u8(), host, queue_size=r.choice((4, 16, 256)))

    def host_step(r: Reader) -> None:
        which = r.u8() % 3
        if which == 0 and host.on_request is not None:      # a host program asks for a guest port
            with device.host_work():
                host.on_request(r.u32(), FakeStream(r), r.take(r.u8() % 16))
        elif which == 1:                                    # a host stream became readable / writable
            for stream in list(host.streams.values()):
                callback = getattr(stream, "readable" if r.flag() else "writable", None)
                if callback is not None:
                    callback()
        else:
            device.notify(r.u8() % 3)
    try:
        exercise(device, r, host_step)
    finally:
        device.close()


class FakeListener:
    def __init__(self, r: Reader) -> None:
        self.r, self.on_client = r, None

    def start_accepting(self, on_client) -> None:
        self.on_client = on_client

    def stop_accepting(self) -> None:
        self.on_client = None

    def close(self) -> None:
        pass


def console_input(data: bytes) -> None:
    from pyvmm.devices.virtio.console import VirtioConsole

    r = Reader(data)
    listeners = {f"port{i}": FakeListener(r) for i in range(r.u8() % 3)}
    device = VirtioConsole(lambda data: None, ports=listeners, queue_size=r.choice((4, 16, 256)),
                           cols=r.u8(), rows=r.u8())

    def host_step(r: Reader) -> None:
        listener = listeners.get(f"port{r.u8() % 3}")
        if listener is not None and listener.on_client is not None:
            listener.on_client(FakeStream(r))
    try:
        exercise(device, r, host_step)
    finally:
        device.close()


def rng_input(data: bytes) -> None:
    from pyvmm.devices.virtio.rng import VirtioRng

    exercise(VirtioRng(source=lambda n: bytes(n)), Reader(data))


def balloon_input(data: bytes) -> None:
    try:
        from pyvmm.devices.virtio.balloon import VirtioBalloon
    except ImportError:   # before the balloon landed
        return
    r = Reader(data)
    device = VirtioBalloon(target_pages=r.u16(), deflate_on_oom=r.flag(), free_page_reporting=r.flag(),
                           stats_interval_s=r.u8() % 3)
    exercise(device, r, lambda r: device.poll_stats() if hasattr(device, "poll_stats") else None)
