"""ConsoleOutput (host/console_output.py): console bytes reach the host in batches, in order,
within the delay, and all of them at pause and close."""

from __future__ import annotations

import threading
import time

from pyvmm.devices.legacy import Uart16550
from pyvmm.bus.interrupt import NullIrqLine
from pyvmm.devices.legacy.uart16550_registers import IER, IER_THRI, IIR_FCR, IIR_NO_INT, LSR, LSR_THRE, RBR_THR
from pyvmm.host.console_output import FLUSH_BYTES, FLUSH_DELAY_NS, ConsoleOutput
from pyvmm.iothread import IoThread


class FakeTimers:
    """call_later() recorded; fire() runs what was asked (the delay is checked by the tests)."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, object]] = []

    def call_later(self, delay_ns, callback):
        self.pending.append((delay_ns, callback))
        return object()

    def fire(self) -> None:
        pending, self.pending = self.pending, []
        for _, callback in pending:
            callback()


class Sink:
    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.threads: set[str] = set()

    def __call__(self, data: bytes) -> None:
        self.calls.append(bytes(data))
        self.threads.add(threading.current_thread().name)


def test_writes_wait_for_the_timer_and_leave_as_one_batch():
    sink, timers = Sink(), FakeTimers()
    output = ConsoleOutput(sink, timers)
    for piece in (b"12", b"\r\n", b"13", b"\r\n"):
        output.write(piece)
    assert sink.calls == []
    assert [delay for delay, _ in timers.pending] == [FLUSH_DELAY_NS]   # one timer for the batch
    timers.fire()
    assert sink.calls == [b"12\r\n13\r\n"]
    assert output.batches == 1
    output.write(b"14")                       # a new batch arms a new timer
    assert len(timers.pending) == 1
    timers.fire()
    assert sink.calls == [b"12\r\n13\r\n", b"14"]


def test_a_timer_that_finds_nothing_outputs_nothing():
    sink, timers = Sink(), FakeTimers()
    output = ConsoleOutput(sink, timers)
    output.write(b"x")
    output.flush()
    timers.fire()
    assert sink.calls == [b"x"]


def test_a_full_batch_leaves_at_once():
    sink, timers = Sink(), FakeTimers()
    output = ConsoleOutput(sink, timers)
    output.write(b"a" * (FLUSH_BYTES - 1))
    assert sink.calls == []
    output.write(b"bc")
    assert sink.calls == [b"a" * (FLUSH_BYTES - 1) + b"bc"]
    timers.fire()                              # the batch's timer comes later and finds nothing
    assert len(sink.calls) == 1


def test_pause_and_close_output_what_waits():
    sink, timers = Sink(), FakeTimers()
    output = ConsoleOutput(sink, timers)
    output.write(b"before pause")
    output.pause()
    assert sink.calls == [b"before pause"]
    output.resume()
    output.write(b"last words")
    output.close()
    assert sink.calls == [b"before pause", b"last words"]
    output.pause()                             # nothing waits: no empty write
    output.close()
    assert len(sink.calls) == 2


def test_order_is_kept_between_writers_and_the_timer():
    """Writers on two threads, the I/O thread's timer and flushes of full batches in between:
    each writer's pieces come out whole and in its order."""
    sink = Sink()
    iothread = IoThread(name="test-io")
    iothread.start()
    try:
        output = ConsoleOutput(sink, iothread)

        def writer(tag: bytes) -> None:
            for i in range(3000):
                output.write(b"<%s%05d" % (tag, i) + b"." * (i % 50) + b">")

        threads = [threading.Thread(target=writer, args=(tag,)) for tag in (b"a", b"b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 5
        while sum(map(len, sink.calls)) < 2 * sum(8 + i % 50 for i in range(3000)) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        iothread.stop()
    data = b"".join(sink.calls)
    pieces = data[1:-1].split(b"><")
    for tag in (b"a", b"b"):
        numbers = [int(piece[1:6]) for piece in pieces if piece.startswith(tag)]
        assert numbers == list(range(3000))
    assert len(pieces) == 6000
    assert output.batches < 6000 // 10   # gathered: far fewer writes than pieces


def test_a_quiet_guests_last_bytes_arrive_from_the_io_thread():
    sink = Sink()
    iothread = IoThread(name="test-io")
    iothread.start()
    try:
        output = ConsoleOutput(sink, iothread)
        output.write(b"login: ")
        deadline = time.monotonic() + 5
        while not sink.calls and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        iothread.stop()
    assert sink.calls == [b"login: "]
    assert sink.threads == {"test-io"}


def test_a_uart_writing_through_it():
    """The UART's loads (one per drain) reach the host together; the guest's view of the
    transmitter does not change."""
    sink, timers = Sink(), FakeTimers()
    output = ConsoleOutput(sink, timers)
    uart = Uart16550(NullIrqLine(), output.write)   # without timers: each byte out as written
    uart.write(IER, bytes([IER_THRI]))
    for byte in b"hello\r\n":
        assert uart.read(LSR, 1)[0] & LSR_THRE
        uart.write(RBR_THR, bytes([byte]))
    assert sink.calls == []
    assert uart.read(IIR_FCR, 1)[0] & IIR_NO_INT == 0      # THRE interrupts as before
    timers.fire()
    assert sink.calls == [b"hello\r\n"]
