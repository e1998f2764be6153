"""ConsoleOutput: the guest's console output gathered for a moment before it reaches the host.

Why: a guest writing lines to its serial console hands the UART a few bytes at a time (Linux's
8250 driver sends each tty write as one load: `seq` makes two per line), and each load was one
write() to the terminal, pipe or log, and one wake-up of whatever reads it. A pipe's reader
woken by a write runs where the writer ran (the kernel treats it as a hand-over), which for a
software-CPU VM is the one host CPU all its threads share (cpu_affinity.py): the reader's work
came out of the guest's time. Output gathered for up to FLUSH_DELAY_NS is one write instead of
hundreds, and nobody at a terminal sees 2 ms.

One per VM (the builder makes it, with the I/O thread whose timer sends a quiet guest's last
bytes); every console of the VM (the serial port, virtio-console's hvc0) writes through it, so
their bytes keep the order they were written in. Nothing here is guest state: the bytes have
left the device. pause() and close() send what waits (a paused VM's timers hold; a snapshot,
a migration or the VM's end must not keep output back), after the UART sent its own.
"""

from __future__ import annotations

import threading
from typing import Callable, Final

from ..iothread import IoThread

FLUSH_DELAY_NS: Final = 2_000_000   # how long the first byte of a batch may wait
FLUSH_BYTES: Final = 64 * 1024      # a batch this big goes at once: what waits is bounded


class ConsoleOutput:
    """write() gathers; the bytes reach `output` within FLUSH_DELAY_NS (from `timers`, the I/O
    thread), at once when FLUSH_BYTES wait, and at flush(), pause() and close(). `output` is
    called by one thread at a time, in the order the bytes were written."""

    def __init__(self, output: Callable[[bytes], None], timers: IoThread) -> None:
        self._output = output
        self._timers = timers
        self._lock = threading.Lock()      # the waiting bytes and the timer
        self._sending = threading.Lock()   # a batch taken and output as one step: order kept
        self._waiting = bytearray()
        self._timer: object | None = None   # the I/O thread's pending call, if any
        self.batches = 0   # calls of `output` (the writes it saved: compare the UART's loads)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._waiting += data
            if len(self._waiting) < FLUSH_BYTES:
                if self._timer is None:
                    self._timer = self._timers.call_later(FLUSH_DELAY_NS, self._timer_fired)
                return
        self.flush()

    def flush(self) -> None:
        """Output what waits, now."""
        with self._sending:
            with self._lock:
                data = bytes(self._waiting)
                self._waiting.clear()
            if data:
                self.batches += 1
                self._output(data)

    def _timer_fired(self) -> None:
        with self._lock:
            self._timer = None
        self.flush()

    def pause(self) -> None:
        """The VM holds still (a Pausable, after the UART): its output leaves now."""
        self.flush()

    def resume(self) -> None:
        pass

    def close(self) -> None:
        """The VM ended (after the UART sent its last load): nothing may stay behind."""
        self.flush()
