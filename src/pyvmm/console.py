"""The host end of the guest's serial console: terminal (raw mode, Ctrl-A escapes) or a log file.

Guest output is written to the terminal (or the log) in batches (host/console_output.py),
by a vCPU thread or the I/O thread. Host input is read by one thread and pushed into the UART; on a
terminal, Ctrl-A x quits, Ctrl-A p presses the ACPI power button (QEMU's system_powerdown)
and Ctrl-A Ctrl-A sends a literal Ctrl-A, like QEMU.
The terminal's settings are restored however pyvmm ends.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import selectors
import select
import termios
import threading
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

CTRL_A = 0x01
ESCAPE_HELP = (b"\r\nC-a x  quit pyvmm\r\nC-a p  press the ACPI power button (the guest shuts down)\r\n"
               b"C-a C-a  send C-a to the guest\r\nC-a h  this help\r\n")


class GuestInput(Protocol):
    """Where keyboard input goes: the UART's receive FIFO."""

    def receive(self, data: bytes) -> int: ...

    def rx_space(self) -> int: ...

    def wait_rx_space(self, timeout: float | None = None) -> int: ...


class Console:
    def __init__(self, *, log_path: str | None = None, stdin_fd: int = 0, stdout_fd: int = 1,
                 read_input: bool | None = None) -> None:
        self._out_fd = stdout_fd
        self._log = None
        if log_path is not None:
            try:
                self._log = open(log_path, "ab", buffering=0)
            except OSError as exc:
                raise OSError(f"cannot open console log {log_path}: {exc.strerror}") from None
            self._out_fd = self._log.fileno()
        self._in_fd = stdin_fd
        self._is_tty = _isatty(stdin_fd)
        # With a log file, the keyboard is not wired to a guest whose output it cannot see.
        self._read_input = read_input if read_input is not None else (log_path is None or not self._is_tty)
        self._saved_termios: list[Any] | None = None
        self._port: GuestInput | None = None
        self._attached = threading.Event()  # input read before the VM exists waits for its UART
        self._on_quit: Callable[[], None] | None = None
        self._on_power_button: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._closing = False
        self._escape = False
        self._output_broken = False
        self.bytes_out = 0

    # --- guest -> host ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._output_broken:
            return
        self.bytes_out += len(data)
        try:
            while data:
                try:
                    written = os.write(self._out_fd, data)
                except BlockingIOError:  # a non-blocking terminal or pipe is full: wait until it drains
                    select.select([], [self._out_fd], [])
                    continue
                data = data[written:]
        except OSError as exc:
            self._output_broken = True
            log.warning("console output stopped: %s", exc.strerror)

    # --- host -> guest ------------------------------------------------------------------

    def attach(self, port: GuestInput, on_quit: Callable[[], None] | None = None,
               on_power_button: Callable[[], None] | None = None) -> None:
        """Send host input to `port` (a UART: receive, rx_space, wait_rx_space); Ctrl-A x calls
        `on_quit`, Ctrl-A p `on_power_button`. Re-attachable: a reboot builds a new UART."""
        self._port, self._on_quit, self._on_power_button = port, on_quit, on_power_button
        self._attached.set()

    def start(self) -> None:
        if not self._read_input or self._thread is not None:
            return
        if self._is_tty:
            self._enter_raw_mode()
        self._thread = threading.Thread(target=self._input_main, name="console-input", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._wake_w < 0:
            return  # closed already
        self._closing = True
        self._attached.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.restore_terminal()
        if self._log is not None:
            self._log.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> "Console":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _enter_raw_mode(self) -> None:
        self._saved_termios = termios.tcgetattr(self._in_fd)
        mode = termios.tcgetattr(self._in_fd)
        iflag, cflag, lflag = 0, 2, 3  # mode[1] (output flags) stays as it is, see below
        mode[iflag] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
        mode[cflag] = (mode[cflag] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        mode[lflag] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        # output processing stays on (as QEMU does): "\n" from a guest still returns the carriage
        termios.tcsetattr(self._in_fd, termios.TCSAFLUSH, mode)
        atexit.register(self.restore_terminal)

    def restore_terminal(self) -> None:
        if self._saved_termios is not None:
            try:
                termios.tcsetattr(self._in_fd, termios.TCSAFLUSH, self._saved_termios)
            except termios.error:
                pass
            self._saved_termios = None

    def _input_main(self) -> None:
        # poll, not epoll: stdin may be a regular file or /dev/null, which epoll refuses
        with selectors.PollSelector() as selector:
            selector.register(self._in_fd, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing:
                ready = [key.fd for key, _ in selector.select()]
                if self._wake_r in ready or self._closing:
                    return
                try:
                    data = os.read(self._in_fd, 256)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    return
                if not data:
                    return  # EOF on a pipe: the guest keeps running, without more input
                if self._is_tty:
                    data = self._filter_escapes(data)
                self._deliver(data)

    def _filter_escapes(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte == ord("x"):
                    if self._on_quit:
                        self._on_quit()
                    return bytes(out)
                if byte == ord("p"):
                    if self._on_power_button:
                        self._on_power_button()
                elif byte == CTRL_A:
                    out.append(CTRL_A)
                elif byte == ord("h"):
                    self.write(ESCAPE_HELP)
            elif byte == CTRL_A:
                self._escape = True
            else:
                out.append(byte)
        return bytes(out)

    def _deliver(self, data: bytes) -> None:
        """Hand `data` to the guest without overrunning its FIFO: wait while the guest is behind."""
        while data and not self._closing:
            if not self._attached.wait(0.1):
                continue
            port = self._port
            assert port is not None  # set before _attached
            space = port.rx_space()
            if space == 0:
                port.wait_rx_space(0.1)  # short, so a close() or a re-attach after reboot is noticed
                continue
            port.receive(data[:space])
            data = data[space:]


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
