"""Run a VM to its end from a config: the reboot loop around build_vm()."""

from __future__ import annotations

import logging
import sys
import time

from .accel.select import choose_accelerator
from .builder import build_vm
from .config import VmConfig
from .vm import EXIT_OK, VmOutcome

log = logging.getLogger(__name__)

DEMO_GUEST = "hello"


def demo_kernel() -> str:
    """The built-in tiny demo guest (`pyvmm run --demo`), assembled on first use."""
    from .guests import build

    return str(build(DEMO_GUEST))


def with_default_guest(config: VmConfig, command: list[str] | None) -> VmConfig:
    """No --kernel: boot the default Debian guest (built on first use), running `command` if given."""
    if config.kernel is not None:
        if command:
            from .images import encode_command

            config.cmdline = f"{config.cmdline} {encode_command(command)}".strip()
        return config
    from .images import default_image

    image = default_image()
    config.kernel, config.initrd = str(image.kernel), str(image.initramfs)
    if config.system_map is None and image.system_map is not None:
        config.system_map = str(image.system_map)
    extra = config.cmdline
    if config.console == "virtio":
        extra += " pyvmm.console=hvc0"
    if config.nets and config.nets[0].tap == "auto":  # the address HostNetwork leaves for the guest
        extra += " pyvmm.ip=10.0.2.15/24,10.0.2.1"
    extra = extra.strip()
    config.cmdline = image.command_line(command or None, extra=extra)
    return config


def run_vm(config: VmConfig, console, choice=None) -> VmOutcome:
    """Boot `config` with `console` as COM1 until the guest ends; `--reboot` restarts it on reset.
    `choice`: the accelerator choose_accelerator() made, if the caller asked first."""
    if choice is None:
        choice = choose_accelerator(config.accel)
    announce = config.accel == "auto"
    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    symbols = None
    if config.system_map is not None:
        from .loader.linux.symbols import LazySymbolTable

        symbols = LazySymbolTable(config.system_map)  # read only if an error needs a name
    while True:
        vm = build_vm(config, console.write, accel=choice.create())
        vm.symbols = symbols
        if announce:  # after the build, so that bad input still ends with exactly one line
            print(f"pyvmm: accelerator {choice.name}: {choice.reason}", file=sys.stderr)
            announce = False
        terminal_device = vm.devices["virtio-console" if config.console == "virtio" else "com1"]
        console.attach(terminal_device,
                       on_quit=lambda: vm.request_stop(VmOutcome("quit", EXIT_OK, "quit from the console (C-a x)")))
        # --timeout bounds the whole run, reboots included
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        outcome = vm.run(remaining)
        if outcome.reason == "reset" and config.reboot:
            log.info("the guest reset the machine: rebooting (--reboot)")
            continue
        return outcome
