"""`pyvmm run -- CMD` from the warm snapshot: restore, give the guest its own identity, run
CMD through the agent with stdin, stdout and stderr streamed, exit with CMD's status.

It is the default for a command in the default guest when nothing asks for another machine
(no kernel, initrd, command-line, memory, vCPU or device options): see `warm_refusal`. The
guest's serial console is not shown (the command's output comes through the agent); with
--console-log it goes to that file.
"""

from __future__ import annotations

import os
import sys

TIMEOUT_STATUS = 124    # as a cold run's --timeout (vm.EXIT_TIMEOUT)
NOT_FOUND_STATUS = 127  # a command that cannot be run, as the cold run's shell reports it

# (option attribute, its default, its flag): any other value asks for a machine the warm
# snapshot is not.
_MACHINE_OPTIONS: tuple[tuple[str, object, str], ...] = (("kernel", None, "--kernel"), ("demo", False, "--demo"), ("initrd", None, "--initrd"),
                    ("boot", "auto", "--boot"), ("append", "", "--append"), ("memory", "256M", "--memory"),
                    ("cpus", 1, "--cpus"), ("module", [], "--module"), ("load_address", None, "--load-address"),
                    ("entry_64", False, "--entry-64"), ("reboot", False, "--reboot"), ("cpu_hide", "", "--cpu-hide"),
                    ("system_map", None, "--system-map"), ("disk", [], "--disk"), ("root_disk", None, "--root-disk"),
                    ("net", [], "--net"), ("vsock", None, "--vsock"), ("rng", None, "--rng"),
                    ("console", "serial", "--console"), ("console_port", [], "--console-port"),
                    ("balloon", None, "--balloon"), ("huge_pages", "none", "--huge-pages"), ("ksm", False, "--ksm"),
                    ("numa", [], "--numa"), ("virtio_mem", None, "--virtio-mem"), ("test_devices", False, "--test-devices"))


def warm_refusal(args) -> str | None:
    """Why `pyvmm run` with these options cannot start from the warm snapshot, or None."""
    from ..config import ConfigError, parse_size
    from .warm import WARM_MEMORY

    for name, default, flag in _MACHINE_OPTIONS:
        value = getattr(args, name, default)
        if name == "memory":
            try:
                value = default if parse_size(str(value), "memory") == WARM_MEMORY else value
            except ConfigError:
                pass      # the cold path reports it
        if value != default:
            return f"{flag} asks for another machine than the warm snapshot's"
    return None


def run_from_snapshot(command: list[str], *, accel: str = "auto", timeout: float | None = None,
                      console_log: str | None = None) -> int:
    """Run `command` in a guest restored from the warm snapshot; its exit status."""
    from ..agent import AgentError, new_machine_id
    from ..agent.client import AgentTimeout
    from ..images import print_to_stderr
    from .guest import start_guest

    log_file = open(console_log, "ab") if console_log else None
    try:
        guest = start_guest(warm=True, accel=accel, console_write=None if log_file is None else _appender(log_file),
                            progress=print_to_stderr, set_identity=False)
        try:
            out, err = sys.stdout.buffer, sys.stderr.buffer
            return guest.client.exec_stream(command, stdin=sys.stdin.fileno() if _stdin_open() else None,
                                            stdout=lambda data: (out.write(data), out.flush()),
                                            stderr=lambda data: (err.write(data), err.flush()), timeout=timeout,
                                            identity=new_machine_id())   # one round trip for both
        except AgentTimeout:
            print(f"pyvmm: the command ran past --timeout {timeout:g} s: killed", file=sys.stderr)
            return TIMEOUT_STATUS
        except AgentError as exc:
            if str(exc).startswith(("exec ", "chdir ")):   # as a shell says it, with its status
                print(f"pyvmm: {exc}", file=sys.stderr)
                return NOT_FOUND_STATUS
            raise
        finally:
            guest.close()
    finally:
        if log_file is not None:
            log_file.close()


def _appender(file):
    def write(data: bytes) -> None:
        file.write(data)
        file.flush()
    return write


def _stdin_open() -> bool:
    try:
        os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return True
