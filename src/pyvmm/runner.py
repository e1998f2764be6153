"""Run a VM to its end from a config: the reboot loop around build_vm()."""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time
from dataclasses import replace

from .accel.select import choose_accelerator
from .builder import build_vm
from .config import DiskConfig, MachineConfig, RunOptions
from .vm import EXIT_OK, VmOutcome

log = logging.getLogger(__name__)

DEMO_GUEST = "hello"


def demo_kernel() -> str:
    """The built-in tiny demo guest (`pyvmm run --demo`), assembled on first use."""
    from .guests import build

    return str(build(DEMO_GUEST))


def with_root_disk(machine: MachineConfig, disk: DiskConfig) -> MachineConfig:
    """`disk` as the root file system (Firecracker's is_root_device): the first disk, so the
    guest names it /dev/vda, and `root=/dev/vda rw` (ro for a read-only disk) on the kernel
    command line. The default kernel reaches it through pyvmm's initramfs (with_default_guest
    supplies it), a kernel with virtio-blk and the file system built in mounts it itself."""
    return replace(machine, disks=(disk, *machine.disks),
                   cmdline=f"{machine.cmdline} root=/dev/vda {'ro' if disk.readonly else 'rw'}".strip())


def _is_default_kernel(path: str, image) -> bool:
    try:
        if os.path.samefile(path, image.kernel):
            return True
        if os.path.getsize(path) != image.manifest["artifacts"]["vmlinuz"]["size"]:
            return False
    except (OSError, KeyError):
        return False
    from .images.image import sha256_file

    return sha256_file(pathlib.Path(path)) == image.manifest["artifacts"]["vmlinuz"]["sha256"]


def with_default_guest(machine: MachineConfig, options: RunOptions,
                       command: list[str] | None) -> tuple[MachineConfig, RunOptions]:
    """No kernel: the default Debian guest (built on first use), running `command` if given.
    The default kernel given explicitly with a root disk (root=) and no initrd gets pyvmm's
    initramfs, which loads the virtio drivers it needs to mount the disk.
    Returns new configs; the caller's are left as they were."""
    if machine.kernel is not None:
        if machine.initrd is None and "root=" in machine.cmdline.split("pyvmm.cmd=")[0]:
            from .images import cached_image, ImageError

            try:
                image = cached_image(verify_hashes=False)
            except ImageError:
                image = None
            if image is not None and _is_default_kernel(machine.kernel, image):
                machine = replace(machine, initrd=str(image.initramfs))
        if command:
            from .images import encode_command

            machine = replace(machine, cmdline=f"{machine.cmdline} {encode_command(command)}".strip())
        return machine, options
    from .images import default_image

    image = default_image()
    if options.system_map is None and image.system_map is not None:
        options = replace(options, system_map=str(image.system_map))
    extra = machine.cmdline
    if machine.console == "virtio":
        extra += " pyvmm.console=hvc0"
    if machine.nets and machine.nets[0].tap == "auto":  # the address HostNetwork leaves for the guest
        extra += " pyvmm.ip=10.0.2.15/24,10.0.2.1"
    machine = replace(machine, kernel=str(image.kernel), initrd=str(image.initramfs),
                      cmdline=image.command_line(command or None, extra=extra.strip()))
    return machine, options


def _press_power_button(vm) -> None:
    from .errors import UserError

    try:
        vm.press_power_button()
    except UserError as exc:
        log.warning("power button: %s", exc)


def run_vm(machine: MachineConfig, options: RunOptions, console, choice=None) -> VmOutcome:
    """Boot `machine` with `console` as COM1 until the guest ends; options.reboot restarts it on
    reset. `choice`: the accelerator choose_accelerator() made, if the caller asked first."""
    if choice is None:
        choice = choose_accelerator(options.accel)
    announce = options.accel == "auto"
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    symbols = None
    if options.system_map is not None:
        from .loader.linux.symbols import LazySymbolTable

        symbols = LazySymbolTable(options.system_map)  # read only if an error needs a name
    while True:
        vm = build_vm(machine, console.write, accel=choice.create())
        vm.symbols = symbols
        if announce:  # after the build, so that bad input still ends with exactly one line
            print(f"pyvmm: accelerator {choice.name}: {choice.reason}", file=sys.stderr)
            announce = False
        terminal_device = vm.devices["virtio-console" if machine.console == "virtio" else "com1"]
        console.attach(terminal_device,
                       on_quit=lambda: vm.request_stop(VmOutcome("quit", EXIT_OK, "quit from the console (C-a x)")),
                       on_power_button=lambda vm=vm: _press_power_button(vm))
        # the timeout bounds the whole run, reboots included
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        outcome = vm.run(remaining)
        if outcome.reason == "reset" and options.reboot:
            log.info("the guest reset the machine: rebooting (--reboot)")
            continue
        return outcome
