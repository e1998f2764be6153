"""pyvmm's command line: `pyvmm run`, `pyvmm kvm-info`, `pyvmm image`, `pyvmm exec`/`cp` (the
guest agent, manage/agent_cli.py), and the VM-management commands (define, start, list, console... in
manage/cli.py).

Bad input ends with one line on stderr and exit status 2; a guest or VMM failure
with one line and the status documented in the README; never a traceback unless
--debug asks for one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from . import __version__, start_up

log = logging.getLogger("pyvmm")


def _int_auto(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


# The options before a subcommand that take no value: what may precede the command's name.
_LEADING_FLAGS = {"-v", "-vv", "-vvv", "--verbose", "--debug"}


def command_named(argv: list[str]) -> str | None:
    """The subcommand `argv` names (its first word after the flags that take no value), or None
    where another word comes first (--help, --version, a typo'd flag): then every command is built."""
    for word in argv:
        if word not in _LEADING_FLAGS:
            return None if word.startswith("-") else word
    return None


class _OneCommand:
    """The subparsers action as the registrars see it when one command is being parsed: only
    that command's parser is built (building all 46, their help text and gettext lookups
    included, cost every start several milliseconds); the others' definitions go to _SKIPPED."""

    def __init__(self, subparsers, wanted: str) -> None:
        self.subparsers, self.wanted, self.found = subparsers, wanted, False

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if name != self.wanted and self.wanted not in kwargs.get("aliases", ()):
            return _SKIPPED  # type: ignore[return-value]
        self.found = True
        return self.subparsers.add_parser(name, **kwargs)


class _Skipped:
    """A parser not being built: whatever is defined on it (arguments, groups, nested commands)
    is dropped."""

    def __getattr__(self, name: str):
        return self._drop

    def _drop(self, *args, **kwargs) -> _Skipped:
        return self


_SKIPPED = _Skipped()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """pyvmm's parser: with `command` (what command_named found), only that command's parser is
    built, unless no command has that name (then all are: argparse's error lists them)."""
    if command is not None:
        parser, built = _build_parser(command)
        if built:
            return parser
    return _build_parser(None)[0]


def _build_parser(only: str | None) -> tuple[argparse.ArgumentParser, bool]:
    """The parser with every command, or `only` that one; and whether that one was found."""
    parser = argparse.ArgumentParser(prog="pyvmm", description="A virtual machine monitor in Python on Linux KVM.")
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    # the same two options after the subcommand (SUPPRESS: do not reset what came before it)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log more (-vv: debug)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    sub = subparsers if only is None else _OneCommand(subparsers, only)

    run = sub.add_parser(
        "run", parents=[common], usage="pyvmm run [options] [-- COMMAND [ARG...]]",
        help="boot a kernel (default: the Debian guest image) and optionally run a command in it",
        description="Boot a guest. Without --kernel, the default Debian guest (pyvmm image build) boots "
                    "to a shell, or runs COMMAND and exits with its exit status.")
    run.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="COMMAND", help="command to run in the default guest (after --)")
    run.add_argument("--kernel", metavar="FILE",
                     help="Linux bzImage/vmlinux, ELF, Multiboot or (with --load-address) flat kernel image")
    run.add_argument("--demo", action="store_true", help="boot the built-in tiny demo kernel instead of Linux")
    run.add_argument("--initrd", metavar="FILE", help="initial ramdisk for a Linux kernel")
    run.add_argument("--boot", choices=("auto", "pvh", "bzimage"), default="auto",
                     help="how to boot a Linux bzImage: pvh (pyvmm decompresses it on the host; the default "
                          "when the kernel supports it) or bzimage (the 64-bit boot protocol)")
    run.add_argument("--append", metavar="ARGS", default="", help="kernel command line")
    run.add_argument("--memory", "-m", metavar="SIZE", default="256M", help="guest RAM, e.g. 256M, 2G (default 256M)")
    run.add_argument("--cpus", "-c", metavar="N", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--module", metavar="'FILE [ARGS]'", action="append", default=[],
                     help="Multiboot module (repeatable)")
    run.add_argument("--load-address", metavar="ADDR", type=_int_auto,
                     help="load --kernel as a flat binary at ADDR and enter it there")
    run.add_argument("--entry-64", action="store_true", help="enter a flat binary in 64-bit long mode (default: 32-bit)")
    run.add_argument("--console-log", metavar="FILE", help="append the serial console to FILE instead of the terminal")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--warm", action="store_true",
                       help="start COMMAND's guest from the warm snapshot (the default for a command in the default "
                            "guest when no option asks for another machine): restored in a fraction of a boot, "
                            "with its own identity; output and exit status through the guest agent")
    start.add_argument("--cold", action="store_true",
                       help="boot the guest instead of restoring the warm snapshot (the console shows the boot)")
    run.add_argument("--reboot", action="store_true", help="restart the VM when the guest resets it (default: stop)")
    run.add_argument("--timeout", metavar="SECONDS", type=float, help="stop the VM after SECONDS (exit status 124)")
    run.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                     help="CPU backend: kvm (hardware), tcg (software CPU) or auto (default: KVM when it runs "
                          "guest kernel code natively, else the software CPU)")
    run.add_argument("--seccomp", choices=("kill", "log", "off"),
                     help="system-call filters once the VM is set up (seccomp/allowlist.py): kill the VM's process "
                          "on a call outside them, log it (kernel log), or off (default: $PYVMM_SECCOMP, else kill)")
    run.add_argument("--cpu-hide", metavar="FEATURES", default="",
                     help="comma-separated CPUID features to hide from the guest, e.g. xsave,cx16")
    run.add_argument("--system-map", metavar="PATH",
                     help="the guest kernel's System.map (or a copy of its /proc/kallsyms): errors at a guest "
                          "address name the kernel function (default: the default guest's System.map)")

    run.add_argument("--disk", metavar="PATH[,readonly][,serial=ID][,transport=pci|mmio]", action="append", default=[],
                     help="a raw disk image as virtio-blk /dev/vdX (repeatable); vhost-user=SOCKET instead of PATH "
                          "connects a vhost-user-blk back-end")
    run.add_argument("--root-disk", metavar="PATH[,readonly][,serial=ID][,transport=pci|mmio]",
                     help="boot from this disk's root file system (/dev/vda, root=/dev/vda on the command line; "
                          "`pyvmm image rootfs` builds one)")
    run.add_argument("--net", metavar="tap=NAME|auto[,mac=MAC][,transport=pci|mmio]", action="append", default=[],
                     help="a virtio-net NIC on a TAP device; tap=auto creates one in a new network namespace "
                          "(host 10.0.2.1/24)")
    run.add_argument("--vsock", metavar="cid=N,uds=PATH[,transport=pci|mmio]",
                     help="virtio-vsock with guest CID N; host side as Unix sockets (PATH and PATH_PORT)")
    run.add_argument("--rng", nargs="?", const="pci", metavar="TRANSPORT", choices=("pci", "mmio"),
                     help="a virtio-rng fed from the host's entropy (transport pci by default, or mmio)")
    run.add_argument("--balloon", nargs="?", const="", metavar="[amount=MIB][,deflate-on-oom][,free-page-reporting]"
                     "[,stats=S][,transport=pci|mmio]",
                     help="a virtio-balloon: its initial target (MiB taken from the guest), deflate on OOM, free page "
                          "reporting (freed guest pages go back to the host), statistics every S seconds")
    run.add_argument("--huge-pages", choices=("none", "2M", "transparent"), default="none",
                     help="back guest RAM with 2 MiB hugetlb pages (reserved on the host) or transparent huge pages")
    run.add_argument("--ksm", action="store_true", help="mark guest RAM mergeable by KSM (when the host runs it)")
    run.add_argument("--test-devices", action="store_true",
                     help="the devices QEMU's test kernels use: fw_cfg (ports 0x510-0x511: signature, CPU count, "
                          "RAM size) and pc-testdev (0xe0 port latch, 0x2000+N drives ISA IRQ N)")
    run.add_argument("--console", metavar="serial|virtio[,transport=pci|mmio]", default="serial",
                     help="the guest's console: serial (COM1, ttyS0; the default) or virtio (hvc0)")
    run.add_argument("--console-port", metavar="NAME=SOCKET", action="append", default=[],
                     help="a named virtio-console port (guest: /dev/vportNpM, /sys/class/virtio-ports/*/name) "
                          "whose host side is a Unix socket pyvmm listens on (repeatable)")
    run.add_argument("--numa", metavar="cpus=LIST,mem=SIZE[,distances=D:D...]", action="append", default=[],
                     help="a guest NUMA node (repeat for each, in order; ACPI SRAT/SLIT): its vCPUs (e.g. 0-1), its "
                          "memory (the nodes' add up to --memory), its distance to each node (default 10 to itself, "
                          "20 to others)")
    run.add_argument("--virtio-mem", metavar="SIZE[,transport=pci|mmio]",
                     help="a virtio-mem device: up to SIZE (a multiple of 128M) of memory the guest can be given "
                          "and take back in 2 MiB blocks while it runs (pyvmm mem resize)")
    from .images.cli import register_cli
    from .manage.cli import register as register_manage

    register_cli(sub)
    register_manage(sub, common)
    from .manage.agent_cli import register_cli as register_agent_cli

    register_agent_cli(sub, common)
    from .manage.mem_cli import register_cli as register_mem_cli

    register_mem_cli(sub, common)
    from .ui.cli import register as register_ui

    register_ui(sub, common)

    sub.add_parser("firecracker", help="a VM driven by Firecracker's command line and API (pyvmm firecracker --help)",
                   add_help=False)
    sub.add_parser("jail", help="start a managed VM's process in a jail (pyvmm jail --help; pyvmm start --jail)",
                   add_help=False)
    info = sub.add_parser("kvm-info", parents=[common], help="what this host's KVM offers, and how fast it runs guest kernel code")
    info.add_argument("--no-calibrate", action="store_true", help="skip the calibration guest")
    return parser, not isinstance(sub, _OneCommand) or sub.found


def entry() -> NoReturn:
    """The `pyvmm` command (and `python -m pyvmm.cli`): main(), then the process ends without the
    interpreter's teardown (start_up.exit_process)."""
    start_up.exit_process(main())


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["firecracker"]:  # Firecracker's own flags, parsed by the launcher itself
        from .manage.firecracker import main as firecracker_main

        return firecracker_main(words[1:])
    if words[:1] == ["jail"]:
        from .manage.jailer import main as jail_main

        return jail_main(words[1:])
    start_up.begin()  # dataclass code reused; the heap frozen when a VM starts
    try:
        return _main(argv)
    finally:  # (main called in a process that goes on)
        start_up.end()


def _main(argv: list[str] | None) -> int:
    parser = build_parser(command_named(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="pyvmm: %(levelname)s: %(name)s: %(message)s")
    if args.subcommand is None:
        parser.print_help()
        return 2
    from .errors import ConfigError, UserError, user_error_message

    try:
        if args.subcommand == "run":
            return _cmd_run(args)
        if args.subcommand == "image":
            from .images.cli import run_image_command

            return run_image_command(args)
        if args.subcommand == "ui":
            from .ui.cli import run as run_ui

            return run_ui(args)
        if args.subcommand in ("exec", "cp"):
            from .manage.agent_cli import run_agent_command

            return run_agent_command(args)
        if args.subcommand == "mem":
            from .manage.mem_cli import run_mem_command

            return run_mem_command(args)
        from .manage.cli import COMMANDS as MANAGE_COMMANDS, run as run_manage

        if args.subcommand in MANAGE_COMMANDS:

            return run_manage(args)
        if args.subcommand == "kvm-info":
            from .hostinfo import print_kvm_info

            return print_kvm_info(calibrate_guest=not args.no_calibrate)
    except KeyboardInterrupt:
        return 130
    except (UserError, OSError) as exc:  # bad input, an unusable host, a file that cannot be read
        message = exc.render(cli_name(exc.field)) if isinstance(exc, ConfigError) and exc.field else \
            user_error_message(exc)
        print(f"pyvmm: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(f"pyvmm: internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", file=sys.stderr)
        return 6
    return 2


# The flag that sets each config field (MachineConfig and RunOptions), for error messages.
_FLAGS = {"kernel": "--kernel", "initrd": "--initrd", "boot": "--boot", "cmdline": "--append", "memory": "--memory",
          "cpus": "--cpus", "modules": "--module", "flat_address": "--load-address", "flat_64bit": "--entry-64",
          "cpu_hide": "--cpu-hide", "disks": "--disk", "root_disk": "--root-disk", "nets": "--net", "vsock": "--vsock", "rng": "--rng",
          "console": "--console", "console_transport": "--console", "console_ports": "--console-port", "numa": "--numa", "virtio_mem_size": "--virtio-mem",
          "virtio_mem_transport": "--virtio-mem",
          "accel": "--accel", "timeout": "--timeout", "reboot": "--reboot", "console_log": "--console-log",
          "system_map": "--system-map", "balloon": "--balloon", "huge_pages": "--huge-pages", "ksm": "--ksm",
          "test_devices": "--test-devices"}
# Option keys inside a flag's value that are spelled differently from the field ("": unnamed).
_OPTION_KEYS = {"vhost_user": "vhost-user", "path": "", "amount_mib": "amount", "stats_interval_s": "stats"}


def cli_name(field: str) -> str:
    """A config field as the command line names it: 'disks[1].serial' -> '--disk serial'."""
    top, _, rest = field.partition(".")
    flag = _FLAGS.get(top.split("[")[0], top)
    key = _OPTION_KEYS.get(rest, rest)
    return f"{flag} {key}" if key else flag


def _virtio_mem(text: str | None) -> dict:
    """--virtio-mem SIZE[,transport=pci|mmio] as MachineConfig fields."""
    from .config import ConfigError, parse_size, parse_transport

    if text is None:
        return {}
    size, _, rest = text.partition(",")
    if not size.strip():
        raise ConfigError(": give the region's size, e.g. 1G", "virtio_mem_size")
    return {"virtio_mem_size": parse_size(size, "virtio_mem_size"),
            "virtio_mem_transport": parse_transport(rest, "virtio_mem_transport")}


def _cmd_run(args) -> int:
    from .config import (BalloonConfig, ConfigError, ConsolePort, DiskConfig, MachineConfig, NetConfig, RunOptions, VsockConfig,
                         parse_numa_node, parse_size, parse_transport)
    from .console import Console
    from .accel.select import choose_accelerator
    from .runner import demo_kernel, run_vm, with_default_guest, with_root_disk

    if args.load_address is not None and not args.kernel:
        raise ConfigError("--load-address needs --kernel")
    words = args.guest_command
    if words and words[0] != "--":
        raise ConfigError(f"unexpected argument {words[0]!r}: put the guest command after --")
    command = words[1:]
    if args.demo and (args.kernel or command):
        raise ConfigError("--demo boots the built-in demo kernel: it takes no --kernel and no command")
    from . import seccomp

    seccomp.configure(args.seccomp or seccomp.default_mode())
    from .host.cpu_affinity import place_vm_threads
    place_vm_threads()  # the VM's threads on one host CPU (software CPU)
    if command and not args.cold:
        from .sandbox.run import run_from_snapshot, warm_refusal

        refusal = warm_refusal(args)
        if refusal is None:
            RunOptions(accel=args.accel, timeout=args.timeout, console_log=args.console_log).validate()
            return run_from_snapshot(command, accel=args.accel, timeout=args.timeout, console_log=args.console_log)
        if args.warm:
            raise ConfigError(f"--warm: {refusal}")
    elif args.warm:
        raise ConfigError("--warm starts a command's guest from the warm snapshot: give the command after --")
    console_kind, _, console_options = args.console.partition(",")
    machine = MachineConfig(
        kernel=demo_kernel() if args.demo else args.kernel,
        initrd=args.initrd,
        boot=args.boot,
        cmdline=args.append,
        memory=parse_size(args.memory, "memory"),
        cpus=args.cpus,
        modules=tuple(args.module),
        flat_address=args.load_address,
        flat_64bit=args.entry_64,
        cpu_hide=frozenset(name.strip() for name in args.cpu_hide.split(",") if name.strip()),
        disks=tuple(DiskConfig.parse(text, f"disks[{i}]") for i, text in enumerate(args.disk)),
        nets=tuple(NetConfig.parse(text, f"nets[{i}]") for i, text in enumerate(args.net)),
        vsock=VsockConfig.parse(args.vsock) if args.vsock else None,
        rng=args.rng,
        console=console_kind,
        console_transport=parse_transport(console_options, "console_transport"),
        console_ports=tuple(ConsolePort.parse(text, f"console_ports[{i}]") for i, text in enumerate(args.console_port)),
        balloon=BalloonConfig.parse(args.balloon) if args.balloon is not None else None,
        huge_pages=args.huge_pages, ksm=args.ksm, test_devices=args.test_devices,
        numa=tuple(parse_numa_node(text, f"numa[{i}]") for i, text in enumerate(args.numa)),
        **_virtio_mem(args.virtio_mem),
    )
    options = RunOptions(accel=args.accel, timeout=args.timeout, reboot=args.reboot, console_log=args.console_log,
                         system_map=args.system_map)
    if args.root_disk:
        machine = with_root_disk(machine, DiskConfig.parse(args.root_disk, "root_disk"))
    machine.validate()
    options.validate()
    from .memory.backing import check_host

    check_host(machine.backing(), machine.memory)  # huge pages the host cannot give: before any build
    # an unusable accelerator is bad input too: say so before a first run builds the default guest
    choice = choose_accelerator(options.accel)
    machine, options = with_default_guest(machine, options, command)
    # one machine, built once (unless --reboot): no set-up calls once it runs (seccomp/allowlist.py)
    seccomp.configure(seccomp.mode(), rebuilds=options.reboot)
    with Console(log_path=options.console_log) as console:
        outcome = run_vm(machine, options, console, choice)
    if outcome.is_error:
        print(f"pyvmm: {outcome.message}", file=sys.stderr)
    else:
        log.info("%s", outcome.message)
    return outcome.status

if __name__ == "__main__":
    entry()
