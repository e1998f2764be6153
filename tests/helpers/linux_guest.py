"""Booting the default Linux guest in tests: every boot passes through the kernel-warning gate.

`LinuxBoots` (the `pyvmm` fixture of tests/linux) starts `pyvmm run` as a child process and
keeps every byte of its console output with the host time it arrived. A boot's output is
checked against pyvmm.images.kernel_warnings when the test collects it (`run`, `finish`)
and, for anything still unchecked, when the test ends. Boots get `loglevel=5` appended to
their kernel command line: the default guest's `quiet` would keep warnings off the console.
`pyvmm.in_process(machine, command)` boots the default guest as a Vm in the test's own process
(InProcessGuest), for tests that pause, save and restore it; its console is gated alike.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import termios
import threading
import time
from typing import Iterable

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings

BOOT_TIMEOUT = 400


def gated_argv(args: Iterable[str]) -> list[str]:
    """`pyvmm ARGS` with CONSOLE_LOGLEVEL added to a `run`'s kernel command line (merged into
    its --append, which argparse would otherwise let the last one win)."""
    args = list(args)
    if not args or args[0] != "run":
        return [sys.executable, "-m", "pyvmm.cli", *args]
    end = args.index("--") if "--" in args else len(args)
    options, command = args[:end], args[end:]
    if "--append" in options:
        at = options.index("--append") + 1
        options[at] = f"{options[at]} {CONSOLE_LOGLEVEL}".strip()
    else:
        options += ["--append", CONSOLE_LOGLEVEL]
    return [sys.executable, "-m", "pyvmm.cli", *options, *command]


class ConsoleRecord:
    """A guest's console output as it arrived, `chunks` of (host monotonic time, bytes), and the
    kernel-warning gate over it; shared by GuestRun and InProcessGuest."""

    def __init__(self, expected_warnings: Iterable[str]) -> None:
        self.expected_warnings = tuple(expected_warnings)
        self.chunks: list[tuple[float, bytes]] = []
        self.checked = False
        self._arrived = threading.Condition()

    def _record(self, chunk: bytes) -> None:
        """Keep `chunk` and wake whoever waits for output (call with `_arrived` held)."""
        self.chunks.append((time.monotonic(), chunk))
        self._arrived.notify_all()

    @property
    def output(self) -> bytes:
        with self._arrived:
            return b"".join(chunk for _, chunk in self.chunks)

    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def _check_kernel_warnings(self, context: str) -> None:
        self.checked = True
        warnings = find_kernel_warnings(self.output, self.expected_warnings)
        assert not warnings, f"{describe(warnings)}\n({context})"


class GuestRun(ConsoleRecord):
    """One `pyvmm` process. Its console (stdout, or the terminal with `terminal=True`) is read
    by a thread into `chunks`: (host monotonic time, bytes) as they arrive."""

    def __init__(self, args: Iterable[str], *, expected_warnings: Iterable[str] = (), stdin=subprocess.DEVNULL,
                 terminal: bool = False) -> None:
        super().__init__(expected_warnings)
        self.argv = gated_argv(args)
        self.terminal_mode_before: list | None = None
        self._eof = False
        if terminal:  # stdin, stdout and stderr on a pseudo-terminal, as a person's shell has them
            self.master, slave = pty.openpty()
            self.terminal_mode_before = termios.tcgetattr(slave)
            self.process = subprocess.Popen(self.argv, stdin=slave, stdout=slave, stderr=slave,
                                            start_new_session=True, env=dict(os.environ, TERM="dumb"))
            os.close(slave)
            self._console_fd = self.master
        else:
            self.master = None
            self.process = subprocess.Popen(self.argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env=dict(os.environ))
            self._console_fd = self.process.stdout.fileno()
        self._stderr_data: list[bytes] = []
        self._readers = [threading.Thread(target=self._read_console, daemon=True)]
        if self.process.stderr is not None:  # drained as it comes: a full pipe would stop pyvmm
            self._readers.append(threading.Thread(target=lambda: self._stderr_data.append(self.process.stderr.read()),
                                                  daemon=True))
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_console(self) -> None:
        while True:
            try:
                chunk = os.read(self._console_fd, 65536)
            except OSError:  # EIO: a pty's last slave closed
                chunk = b""
            with self._arrived:
                if chunk:
                    self._record(chunk)
                else:
                    self._eof = True
                    self._arrived.notify_all()
            if not chunk:
                return

    # --- the console ------------------------------------------------------------------------

    def send(self, data: bytes) -> float:
        """Write `data` to the guest's console input; the host time just before it went."""
        sent = time.monotonic()
        if self.master is not None:
            os.write(self.master, data)
        else:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        return sent

    def wait_for(self, marker: bytes, *, after: int = 0, timeout: float = BOOT_TIMEOUT) -> tuple[float, int]:
        """Wait until `marker` appears in the console output at or after offset `after`: the host
        time the chunk that completed it arrived, and the offset just past it."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                data, length = b"", 0
                for arrived, chunk in self.chunks:
                    data += chunk
                    found = data.find(marker, after)
                    if found >= 0:
                        return arrived, found + len(marker)
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    raise AssertionError(f"{marker!r} not seen on the console "
                                         f"({'pyvmm exited' if self._eof else f'{timeout:g} s'}); "
                                         f"last output: {self.output[-1500:].decode(errors='replace')}")
                self._arrived.wait(remaining)

    # --- the end ------------------------------------------------------------------------------

    def finish(self, timeout: float = BOOT_TIMEOUT) -> subprocess.CompletedProcess:
        """Wait for pyvmm to exit and its console to end; the run, checked by the gate."""
        try:
            self.process.wait(timeout)
        finally:
            self.kill()
        completed = subprocess.CompletedProcess(self.argv, self.process.returncode, self.text(),
                                                self._stderr())
        self.check_kernel_warnings()
        return completed

    def _stderr(self) -> str:
        # on a terminal stderr is part of the console
        return b"".join(self._stderr_data).decode(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        for reader in self._readers:
            reader.join(10)
        if self.master is not None:
            try:
                os.close(self.master)
            except OSError:
                pass
            self.master = -1

    def check_kernel_warnings(self) -> None:
        self._check_kernel_warnings(f"pyvmm {' '.join(self.argv[3:])}")


class InProcessGuest(ConsoleRecord):
    """The default guest as a Vm in this process, for tests that need the Vm itself (pause,
    save, restore). Its console output is kept like a GuestRun's and gated the same way;
    `console_write` is what a VM rebuilt for it (a restore) writes its console to. The kernel
    command line gets CONSOLE_LOGLEVEL, as `pyvmm run` boots here do."""

    def __init__(self, machine, command: list[str], *, accel: str = "tcg", expected_warnings: Iterable[str] = ()) -> None:
        from dataclasses import replace

        from pyvmm.accel.select import choose_accelerator
        from pyvmm.builder import build_vm
        from pyvmm.config import RunOptions
        from pyvmm.loader.linux.symbols import LazySymbolTable
        from pyvmm.runner import with_default_guest

        machine = replace(machine, cmdline=f"{machine.cmdline} {CONSOLE_LOGLEVEL}".strip())
        super().__init__(expected_warnings)
        self.machine, options = with_default_guest(machine, RunOptions(), command)
        self.symbols = LazySymbolTable(options.system_map) if options.system_map else None
        self.vm = build_vm(self.machine, self.console_write, accel=choose_accelerator(accel).create())
        self.vm.symbols = self.symbols

    def console_write(self, data: bytes) -> None:
        with self._arrived:
            self._record(bytes(data))

    def wait_for(self, marker: bytes, *, after: int = 0, timeout: float = BOOT_TIMEOUT) -> int:
        """Wait until `marker` appears at or after offset `after`; the offset just past it."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                data = b"".join(chunk for _, chunk in self.chunks)
                found = data.find(marker, after)
                if found >= 0:
                    return found + len(marker)
                remaining = deadline - time.monotonic()
                if self.vm.stopped or remaining <= 0:
                    raise AssertionError(f"{marker!r} not seen on the console "
                                         f"({self.vm.outcome.message if self.vm.stopped else f'{timeout:g} s'}); "
                                         f"last output: {data[-1500:].decode(errors='replace')}")
                self._arrived.wait(min(remaining, 0.2))

    def kill(self) -> None:
        self.vm.close()

    def run_to_end(self, collect=lambda vm: None, timeout: float = 600):
        """Start the VM, wait until it stops, take `collect(vm)` before closing it, then check the
        console for kernel warnings: (the outcome, the console's text, what collect returned)."""
        try:
            self.vm.start()
            outcome = self.vm.wait(timeout)
            collected = collect(self.vm)
        finally:
            self.kill()
        self.check_kernel_warnings()
        return outcome, self.text(), collected

    def check_kernel_warnings(self) -> None:
        self._check_kernel_warnings(f"in-process guest: {self.machine.cmdline}")


class AdoptedGuest(InProcessGuest):
    """A default-guest VM made in this process by other means than a boot (a clone of a
    snapshot): `make_vm(console_write)` returns it; its console is kept and gated like a boot's."""

    def __init__(self, make_vm, *, symbols=None, expected_warnings: Iterable[str] = ()) -> None:
        ConsoleRecord.__init__(self, expected_warnings)
        self.symbols = symbols
        self.vm = make_vm(self.console_write)
        self.vm.symbols = symbols
        self.machine = self.vm.machine


class LinuxBoots:
    """The `pyvmm` fixture: `pyvmm(*args)` runs pyvmm to its end (a CompletedProcess with text
    output), `pyvmm.start(*args)` starts it (a GuestRun). Kinds the test's
    `kernel_warnings_expected` marker names are allowed; every other warning fails the test."""

    def __init__(self, expected_warnings: Iterable[str] = ()) -> None:
        self.expected_warnings = tuple(expected_warnings)
        self.runs: list[GuestRun | InProcessGuest] = []

    def start(self, *args: str, stdin=subprocess.DEVNULL, terminal: bool = False) -> GuestRun:
        run = GuestRun(args, expected_warnings=self.expected_warnings, stdin=stdin, terminal=terminal)
        self.runs.append(run)
        return run

    def in_process(self, machine, command: list[str], *, accel: str = "tcg") -> InProcessGuest:
        """Boot the default guest (a MachineConfig without a kernel) as a Vm in this process."""
        guest = InProcessGuest(machine, command, accel=accel, expected_warnings=self.expected_warnings)
        self.runs.append(guest)
        return guest

    def adopt(self, make_vm, *, symbols=None) -> AdoptedGuest:
        """A default-guest VM that `make_vm(console_write)` makes (e.g. pyvmm.clones.start_clone),
        its console recorded and gated like every boot's."""
        guest = AdoptedGuest(make_vm, symbols=symbols, expected_warnings=self.expected_warnings)
        self.runs.append(guest)
        return guest

    def __call__(self, *args: str, timeout: float = BOOT_TIMEOUT) -> subprocess.CompletedProcess:
        return self.start(*args).finish(timeout)

    def close(self) -> None:
        """At the end of the test: stop what still runs, and gate what no one checked."""
        for run in self.runs:
            run.kill()
        for run in self.runs:
            if not run.checked:
                run.check_kernel_warnings()


def warm_run(*args: str, log, input: str | None = None) -> subprocess.CompletedProcess:
    """`pyvmm run ARGS` as a user types it: it restores the warm snapshot, which the `pyvmm`
    fixture cannot (its --append asks for a cold boot). The restored guest's console goes to
    `log` and passes the kernel-warning gate (a run refused before any VM leaves no log)."""
    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", "run", "--console-log", str(log), *args],
                            stdin=subprocess.DEVNULL if input is None else None, input=input,
                            capture_output=True, text=True, timeout=300)
    if log.exists():
        warnings = find_kernel_warnings(log.read_bytes(), ())
        assert not warnings, describe(warnings)
    return result
