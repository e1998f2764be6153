"""`pyvmm firecracker`: a launcher that takes Firecracker's command line, so programs written to
drive Firecracker can drive pyvmm by being given its path instead.

Like Firecracker it runs in the foreground, one VM per process: it serves the API on
--api-sock (unless --no-api), boots --config-file at once if given (else waits for
InstanceStart), puts the guest's serial console on its stdout and its stdin on the serial
port, and exits when the VM stops (a guest reboot ends it too, as Firecracker's does); SIGTERM and SIGINT stop the VM cleanly
and end the process with status 0.
Flags that mean nothing to pyvmm (metadata, boot timer, a BPF --seccomp-filter...) are
accepted and ignored with a log line; --no-seccomp turns pyvmm's filters off. Guests told `pci=off` (as Firecracker's usually are) get their
virtio devices on virtio-mmio, which they find through ACPI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from .. import __version__, start_up
from ..errors import UserError, user_error_message

log = logging.getLogger(__name__)

# Firecracker's flags that take a value / none, which pyvmm accepts and ignores.
IGNORED_WITH_VALUE = ("--http-api-max-payload-size", "--mmds-size-limit", "--metadata", "--metrics-path",
                      "--seccomp-filter", "--parent-cpu-time-us", "--start-time-cpu-us", "--start-time-us",
                      "--describe-snapshot", "--module")
IGNORED_FLAGS = ("--boot-timer", "--show-level", "--show-log-origin", "--enable-pci")
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "warn": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG, "trace": logging.DEBUG, "off": logging.CRITICAL + 10}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvmm firecracker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-sock", default="/run/firecracker.socket", help="the API's Unix socket")
    parser.add_argument("--config-file", help="boot this configuration (Firecracker's JSON layout) at once")
    parser.add_argument("--no-api", action="store_true", help="serve no API (needs --config-file)")
    parser.add_argument("--id", default="anonymous-instance", help="the instance id GET / reports")
    parser.add_argument("--log-path", help="pyvmm's log goes to this file")
    parser.add_argument("--level", default="Warning", help="log level: Error, Warning, Info, Debug, Trace, Off")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--no-seccomp", action="store_true", help="no system-call filters (else $PYVMM_SECCOMP's mode)")
    for flag in IGNORED_WITH_VALUE:
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in IGNORED_FLAGS:
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    start_up.begin()  # dataclass code reused; the heap frozen when the VM starts
    if args.version:
        print(f"Firecracker v{__version__} (pyvmm)\n")
        return 0
    level = LEVELS.get(args.level.lower())
    if level is None:
        print(f"pyvmm: error: --level {args.level!r}: use Error, Warning, Info, Debug, Trace or Off", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, filename=args.log_path,
                        format="%(asctime)s [%(name)s] %(levelname)s %(message)s")
    for flag in IGNORED_WITH_VALUE + IGNORED_FLAGS:
        if getattr(args, flag[2:].replace("-", "_")) not in (None, False):
            log.info("%s means nothing to pyvmm: ignored", flag)
    if args.no_api and not args.config_file:
        print("pyvmm: error: --no-api needs --config-file", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except (UserError, OSError) as exc:
        print(f"pyvmm: error: {user_error_message(exc)}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from ..api.console import ConsoleHub
    from ..api.instance import VmInstance
    from ..api.schema import VmSpec
    from ..api.server import ApiServer

    class StdoutConsole(ConsoleHub):
        def write(self, data: bytes) -> None:
            super().write(data)
            try:
                os.write(1, data)
            except OSError:
                pass

    spec = None
    if args.config_file:
        try:
            with open(args.config_file) as config:
                document = json.load(config)
        except ValueError as exc:
            raise UserError(f"{args.config_file}: not valid JSON: {exc}") from None
        spec = VmSpec.from_document(document)
    if os.path.exists(args.api_sock) and not args.no_api:
        raise UserError(f"{args.api_sock}: the API socket exists already (another VMM, or a stale one: remove it)")
    from ..accel.kvm.accelerator import install_kick_handler

    install_kick_handler()  # from the main thread: InstanceStart and snapshot loads build VMs on the API's threads
    from .. import seccomp

    # Firecracker filters unless told --no-seccomp; pyvmm's mode is $PYVMM_SECCOMP's (kill by default)
    seccomp.configure("off" if args.no_seccomp else seccomp.default_mode(), helpers=True)  # API hot-plug
    from ..host.cpu_affinity import place_vm_threads
    place_vm_threads()  # the VM's threads on one host CPU (software CPU)
    console = StdoutConsole()
    instance = VmInstance(args.id, spec, console=console)
    instance.adapt_spec = firecracker_spec  # at InstanceStart, however the machine was configured
    done = threading.Event()
    instance.on_end(lambda outcome: done.set())

    def on_signal(signum, _frame) -> None:  # end the VM cleanly (TAPs, sockets), then the process
        def stop() -> None:
            try:
                instance.stop(f"stopped by signal {signal.Signals(signum).name}")
            except UserError:  # never started: nothing to stop
                done.set()
        threading.Thread(target=stop, daemon=True).start()

    # before the socket appears: a client that sees it may send SIGTERM at once (the default
    # action would end the process with the socket left behind)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None if args.no_api else ApiServer(instance, args.api_sock).start()
    threading.Thread(target=_stdin_to_console, args=(console,), name="stdin", daemon=True).start()
    try:
        if spec is not None:
            instance.start()
        while not done.wait(1.0):  # a timed wait: the main thread stays responsive to signals
            pass
    finally:
        if server is not None:
            server.close()
        console.close()
    outcome = instance.outcome
    if outcome is not None and outcome.is_error:
        print(f"pyvmm: {outcome.message}", file=sys.stderr)
    return 0 if outcome is None or not outcome.is_error else 1


def firecracker_spec(spec):
    """A configuration as Firecracker would run it: a guest reset ends the VM; virtio devices
    on virtio-mmio when the guest is told pci=off."""
    spec = spec.copy()
    spec.pyvmm.setdefault("on_reboot", "destroy")
    boot_args = (spec.boot_source or {}).get("boot_args", "")
    if "pci=off" in boot_args.split():
        spec.pyvmm.setdefault("transport", "mmio")
    return spec


def entry() -> int:
    """The `pyvmm-firecracker` command: Firecracker's command line, nothing before it."""
    return main(sys.argv[1:])


def _stdin_to_console(console) -> None:
    while True:
        try:
            data = os.read(0, 4096)
        except OSError:
            return
        if not data:
            return
        console.deliver(data)
