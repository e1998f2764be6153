"""`pyvmm console NAME`: this terminal on a running VM's console, until C-] detaches it.

The terminal goes to raw mode (restored however we leave) so keys reach the guest as typed;
C-] (like virsh console and telnet) detaches and the VM runs on. With stdin not a terminal
(a pipe, a file) its bytes are sent and the end of input detaches.
"""

from __future__ import annotations

import os
import select
import socket
import termios
import tty

DETACH = 0x1D  # C-]


def attach(conn: socket.socket, name: str, history: bytes = b"", stdin_fd: int = 0, stdout_fd: int = 1) -> str:
    """Show `history`, then relay between the terminal and `conn` until detached; returns why
    it ended."""
    _write_all(stdout_fd, history)
    is_tty = os.isatty(stdin_fd)
    saved = termios.tcgetattr(stdin_fd) if is_tty else None
    if is_tty:
        os.write(2, f"Connected to {name}. Escape character is ^]\r\n".encode())
        tty.setraw(stdin_fd)
    reading_stdin = True
    try:
        while True:
            fds = [conn.fileno()] + ([stdin_fd] if reading_stdin else [])
            ready, _, _ = select.select(fds, [], [])
            if conn.fileno() in ready:
                data = conn.recv(65536)
                if not data:
                    return "the VM's console closed (the VM stopped)"
                _write_all(stdout_fd, data)
            if stdin_fd in ready and reading_stdin:
                data = os.read(stdin_fd, 4096)
                if not data:
                    return "end of input"
                before, detach, _ = data.partition(bytes([DETACH]))
                if before:
                    conn.sendall(before)
                if detach:
                    return "detached"
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSAFLUSH, saved)
            os.write(2, b"\n")
        conn.close()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            select.select([], [fd], [])
