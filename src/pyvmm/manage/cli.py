"""The VM-management commands, in virsh's vocabulary, over the Python client.

Each command is a thin call into manage.client (the same operations a Python program
uses); errors are UserErrors the top-level CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError

COMMANDS = ("define", "undefine", "start", "list", "dominfo", "info", "domstate", "suspend", "pause", "resume",
            "destroy", "reboot", "shutdown", "console", "create", "clone", "domstats", "top", "migrate",
            "migrate-cancel", "snapshot", "save", "restore", "setmem", "ratelimit", "attach-disk", "detach-disk",
            "attach-interface", "detach-interface", "attach-device", "detach-device", "setvcpus")

DEFINE_HELP = ("A definition is Firecracker's configuration (sections machine-config, boot-source, drives, "
               "network-interfaces, vsock, entropy) plus a [pyvmm] table (accel, console, cpu_hide, on_reboot, "
               "seccomp, jail), "
               "in TOML or JSON. Without boot-source, pyvmm's default Debian guest boots.")


def register(sub, common: argparse.ArgumentParser) -> None:
    def command(name: str, help: str, *, aliases: tuple[str, ...] = (), vm: bool = True, **kw) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common], help=help, aliases=list(aliases), **kw)
        if vm:
            parser.add_argument("name", metavar="NAME", help="the VM's name")
        return parser

    define = command("define", "define a VM from a definition file (TOML or JSON)", vm=False, description=DEFINE_HELP)
    define.add_argument("file", metavar="FILE", help="NAME.toml or NAME.json")
    define.add_argument("--name", help="the VM's name (default: the file's name key, else its stem)")
    define.add_argument("--replace", action="store_true", help="replace an existing definition of that name")
    command("undefine", "remove a VM's definition and its records (not its disks)")
    from .balloon_cli import register as register_balloon

    register_balloon(command)
    from .hotplug_cli import register as register_hotplug

    register_hotplug(command)
    start = command("start", "start a defined VM in the background")
    start.add_argument("--console", action="store_true", help="attach to its console at once")
    start.add_argument("--jail", action="store_true", help="in a jail: namespaces, a private root, cgroup limits, "
                       "a uid of its own, Landlock (the definition's [pyvmm.jail] settings, else the defaults)")
    start.add_argument("--incoming", metavar="ADDRESS", help="do not boot: wait for a live migration of this VM at "
                       "unix:PATH or tcp:HOST:PORT (from `pyvmm migrate` on the source)")
    migrate = command("migrate", "live-migrate a running VM to a VM started with --incoming (pre-copy)")
    migrate.add_argument("destination", metavar="unix:PATH|tcp:HOST:PORT")
    migrate.add_argument("--downtime-ms", type=int, default=300, metavar="N",
                         help="the longest pause the last round may take, estimated (default 300, as QEMU)")
    migrate.add_argument("--bandwidth", metavar="B", help="bytes/s the stream may use (suffixes K, M, G: KiB/s...)")
    migrate.add_argument("--timeout", type=int, metavar="S", help="give up after S seconds (the VM runs on here)")
    migrate.add_argument("--max-rounds", type=int, default=30, metavar="N",
                         help="dirty-page rounds before giving up (default 30)")
    command("migrate-cancel", "cancel a running VM's migration (it runs on here)")
    from .ratelimit_cli import register as register_ratelimit

    register_ratelimit(command)
    listing = command("list", "list running (and crashed) VMs", vm=False)
    listing.add_argument("--all", action="store_true", help="shut-off VMs too")
    command("dominfo", "a VM's state, process, size and last outcome", aliases=("info",))
    command("domstate", "a VM's state")
    command("suspend", "pause a running VM (its vCPUs and devices stand still)", aliases=("pause",))
    command("resume", "resume a paused VM")
    command("destroy", "stop a VM at once")
    command("reboot", "stop the VM and boot it again")
    shutdown = command("shutdown", "press the ACPI power button and wait for the guest to power off")
    shutdown.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="give up after (default 60)")
    console = command("console", "attach this terminal to a running VM's console (C-] detaches)")
    console.add_argument("--replay", type=int, default=16 << 10, metavar="BYTES",
                         help="show the last BYTES the guest printed first (default 16384)")
    command("domstats", "a running VM's statistics (JSON)")
    top = command("top", "running VMs with CPU, exits/s, memory and I/O rates, refreshed (keys: q quit, "
                  "c e m n b i sort, j k select, x exit reasons)", vm=False)
    top.add_argument("name", metavar="NAME", nargs="?", help="one VM's exit reasons and rates instead")
    top.add_argument("--delay", "-d", type=float, default=2.0, metavar="SECONDS", help="refresh interval (default 2)")
    top.add_argument("--iterations", "-n", type=int, metavar="N", help="print N refreshes and exit")
    top.add_argument("--sort", choices=("cpu", "exits", "mem", "name", "block", "net"), default="cpu")
    clone = command("clone", "define a copy of a VM: disks copied sparsely, new MACs and vsock CID; or, with "
                    "--from-snapshot, start a clone of a snapshot", vm=False)
    clone.add_argument("names", metavar="NAME", nargs="+", help="SOURCE NEW_NAME, or NEW_NAME with --from-snapshot")
    clone.add_argument("--from-snapshot", metavar="STATE", help="a snapshot's state file: the clone continues it "
                       "(its memory copy-on-write, its own disks, MACs, vsock socket and CID, a new VM generation ID)")
    clone.add_argument("--mem-file", metavar="MEM", help="the snapshot's memory file (default STATE.mem)")
    snapshot = command("snapshot", "write a snapshot of a running VM (paused for it, resumed after)")
    snapshot.add_argument("path", metavar="PATH", help="the state file (the memory goes to PATH.mem)")
    snapshot.add_argument("--mem-file", metavar="FILE", help="the memory file (default PATH.mem)")
    snapshot.add_argument("--diff", action="store_true",
                          help="only the pages written since the previous snapshot (needs track_dirty_pages)")
    save = command("save", "snapshot a VM to FILE (and FILE.mem), then stop it (virsh save)")
    save.add_argument("path", metavar="FILE")
    save.add_argument("--mem-file", metavar="FILE", help="the memory file (default FILE.mem)")
    restore = command("restore", "start a VM in the background from a snapshot (virsh restore)", vm=False)
    restore.add_argument("path", metavar="FILE", help="a state file written by snapshot or save")
    restore.add_argument("--name", help="the VM's name (default: the snapshotted VM's)")
    restore.add_argument("--mem-file", metavar="FILE", help="the memory file (default FILE.mem)")
    restore.add_argument("--mode", choices=("copy", "cow", "uffd"), default="copy",
                         help="how RAM is loaded: copy (default), cow (copy-on-write mapping of the file), "
                              "uffd (on first touch)")
    create = command("create", "define a VM and start it (default: the Debian guest image)")
    create.add_argument("--kernel", metavar="FILE", help="kernel image (default: pyvmm's Debian guest)")
    create.add_argument("--initrd", metavar="FILE")
    create.add_argument("--append", metavar="ARGS", help="kernel command line (with --kernel)")
    create.add_argument("--kernel-args", metavar="ARGS", help="added to the default guest's kernel command line")
    create.add_argument("--memory", "-m", type=int, default=256, metavar="MIB", help="guest RAM in MiB (default 256)")
    create.add_argument("--cpus", "-c", type=int, default=1, metavar="N")
    create.add_argument("--max-cpus", type=int, metavar="N", help="vCPUs setvcpus may add up to (CPU hotplug)")
    create.add_argument("--disk", action="append", default=[], metavar="PATH[,readonly]", help="a raw disk (repeatable)")
    create.add_argument("--root-disk", metavar="PATH", help="a raw disk to boot from (is_root_device)")
    create.add_argument("--net", action="append", default=[], metavar="TAP[,mac=MAC]", help="a NIC on TAP (or auto)")
    create.add_argument("--vsock", metavar="CID,PATH", help="a vsock device: guest CID and host socket path")
    create.add_argument("--rng", action="store_true", help="a virtio-rng device")
    create.add_argument("--balloon", nargs="?", const="", metavar="[amount=MIB][,deflate-on-oom][,free-page-reporting]"
                        "[,stats=S]", help="a virtio-balloon (pyvmm setmem sets its target later)")
    create.add_argument("--ksm", action="store_true", help="guest RAM mergeable by KSM")
    create.add_argument("--huge-pages", choices=("2M", "transparent"), help="back guest RAM with huge pages")
    create.add_argument("--accel", choices=("auto", "kvm", "tcg"))
    create.add_argument("--console", action="store_true", help="attach to its console at once")


def create_document(args) -> dict:
    """The definition `pyvmm create` makes from its options."""
    document: dict = {"machine-config": {"vcpu_count": args.cpus, "mem_size_mib": args.memory}}
    if args.kernel:
        document["boot-source"] = {"kernel_image_path": args.kernel}
        if args.initrd:
            document["boot-source"]["initrd_path"] = args.initrd
        if args.append:
            document["boot-source"]["boot_args"] = args.append
    elif args.initrd or args.append:
        raise UserError("--initrd and --append need --kernel (the default guest has its own: see --kernel-args)")
    if args.kernel_args and args.kernel:
        raise UserError("--kernel-args is for the default guest: with --kernel, use --append")
    drives = []
    if args.root_disk:
        drives.append({"drive_id": "rootfs", "path_on_host": args.root_disk, "is_root_device": True,
                       "is_read_only": False})
    for index, text in enumerate(args.disk):
        path, _, flag = text.partition(",")
        if flag not in ("", "readonly", "ro"):
            raise UserError(f"--disk: unknown flag {flag!r} (known: readonly)")
        drives.append({"drive_id": f"disk{index}", "path_on_host": path, "is_root_device": False,
                       "is_read_only": bool(flag)})
    if drives:
        document["drives"] = drives
    interfaces = []
    for index, text in enumerate(args.net):
        tap, _, option = text.partition(",")
        interface = {"iface_id": f"eth{index}", "host_dev_name": tap}
        if option:
            if not option.startswith("mac="):
                raise UserError(f"--net: unknown option {option!r} (known: mac=)")
            interface["guest_mac"] = option[4:]
        interfaces.append(interface)
    if interfaces:
        document["network-interfaces"] = interfaces
    if args.vsock:
        cid, _, path = args.vsock.partition(",")
        if not (cid.isascii() and cid.isdigit()) or not path:
            raise UserError(f"--vsock: expected CID,PATH (got {args.vsock!r})")
        document["vsock"] = {"guest_cid": int(cid), "uds_path": path}
    if args.rng:
        document["entropy"] = {}
    if args.balloon is not None:
        from .balloon_cli import balloon_section

        document["balloon"] = balloon_section(args.balloon)
    if args.ksm:
        document["machine-config"]["ksm"] = True
    if args.huge_pages:
        document["machine-config"]["huge_pages"] = {"2M": "2M", "transparent": "Transparent"}[args.huge_pages]
    options = {"accel": args.accel, "kernel_args": args.kernel_args, "max_vcpus": args.max_cpus}
    if any(options.values()):
        document["pyvmm"] = {key: value for key, value in options.items() if value}
    return document


def run(args) -> int:
    from .client import connect

    host = connect()
    name = args.subcommand
    if name == "define":
        vm = host.define(args.file, args.name, replace=args.replace)
        print(f"Domain '{vm.name}' defined from {args.file}")
    elif name == "create":
        vm = host.create(create_document(args), args.name)
        print(f"Domain '{vm.name}' created and started (pid {vm.run.pid()})")
        if args.console:
            return _console(vm, 16 << 10)
    elif name == "top":
        from .top import run as run_top

        if args.delay <= 0 or (args.iterations is not None and args.iterations < 1):
            raise UserError("--delay must be positive and --iterations at least 1")
        if args.name is not None:
            host.vm(args.name)  # an unknown name is one line, exit 2
        return run_top(host, args.name, args.delay, args.iterations, args.sort)
    elif name == "list":
        _print_list(host.list(all=args.all))
    elif name == "clone":
        if args.from_snapshot is not None:
            if len(args.names) != 1:
                raise UserError("clone --from-snapshot STATE takes one name, the new VM's")
            vm = host.clone_from_snapshot(args.from_snapshot, args.names[0], mem_file=args.mem_file)
            print(f"Domain '{vm.name}' cloned from snapshot {args.from_snapshot} and running")
        else:
            if len(args.names) != 2:
                raise UserError("clone takes SOURCE NEW_NAME (or --from-snapshot STATE NEW_NAME)")
            vm = host.vm(args.names[0]).clone(args.names[1])
            print(f"Domain '{vm.name}' cloned from '{args.names[0]}'")
    elif name == "restore":
        vm = host.restore(args.path, name=args.name, mem_file=args.mem_file, mode=args.mode)
        print(f"Domain '{vm.name}' restored from {args.path} (pid {vm.run.pid()})")
    else:
        vm = host.vm(args.name)
        return _vm_command(name, vm, args)
    return 0


def _vm_command(name: str, vm, args) -> int:
    if name.startswith(("attach-", "detach-")) or name == "setvcpus":
        from .hotplug_cli import run as run_hotplug

        return run_hotplug(name, vm, args)
    if name == "setmem":
        from .balloon_cli import setmem

        return setmem(vm, args)
    if name == "undefine":
        vm.undefine()
        print(f"Domain '{vm.name}' has been undefined")
    elif name == "start" and args.incoming:
        pid = vm.start(incoming=args.incoming)
        print(f"Domain '{vm.name}' waits for a migration at {args.incoming} (pid {pid})")
    elif name == "start":
        pid = vm.start(jail=args.jail)
        print(f"Domain '{vm.name}' started (pid {pid})")
        if args.console:
            return _console(vm, 16 << 10)
    elif name in ("dominfo", "info"):
        _print_info(vm.info())
    elif name == "domstate":
        info = vm.info()
        print(info.state + (f" ({info.outcome['reason']}: {info.outcome['message']})"
                            if info.outcome and not info.active else ""))
    elif name in ("suspend", "pause"):
        vm.suspend()
        print(f"Domain '{vm.name}' suspended")
    elif name == "resume":
        vm.resume()
        print(f"Domain '{vm.name}' resumed")
    elif name == "destroy":
        vm.destroy()
        print(f"Domain '{vm.name}' destroyed")
    elif name == "reboot":
        vm.reboot()
        print(f"Domain '{vm.name}' is being rebooted")
    elif name == "shutdown":
        vm.shutdown(args.timeout)
        print(f"Domain '{vm.name}' is shut down")
    elif name == "console":
        return _console(vm, args.replay)
    elif name == "domstats":
        print(json.dumps(vm.stats(), indent=2))
    elif name == "snapshot":
        vm.snapshot(args.path, mem_file=args.mem_file, diff=args.diff)
        print(f"Domain '{vm.name}' snapshotted to {args.path}")
    elif name == "save":
        vm.save(args.path, mem_file=args.mem_file)
        print(f"Domain '{vm.name}' saved to {args.path}")
    elif name == "migrate":
        return _migrate(vm, args)
    elif name == "ratelimit":
        from .ratelimit_cli import run as run_ratelimit

        return run_ratelimit(vm, args)
    elif name == "migrate-cancel":
        vm.cancel_migration()
        print(f"Domain '{vm.name}': migration cancelled")
    return 0


def _migrate(vm, args) -> int:
    """`pyvmm migrate`: start it, show progress, cancel on Ctrl-C."""
    from .progress import ProgressDisplay, parse_bandwidth

    bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth is not None else None
    display = ProgressDisplay(sys.stdout)
    vm.migrate(args.destination, downtime_ms=args.downtime_ms, bandwidth=bandwidth, timeout=args.timeout,
               max_rounds=args.max_rounds, wait=False)
    try:
        final = vm.wait_migration(display.show)
    except KeyboardInterrupt:
        vm.cancel_migration()
        display.done()
        raise UserError(f"{vm.name}: migration cancelled: the VM runs on here") from None
    finally:
        display.done()
    print(f"Domain '{vm.name}' migrated to {args.destination}: {final['total_s']:.2f} s, "
          f"downtime {final['downtime_ms']:.0f} ms, {final['round']} round(s), "
          f"{final['bytes_sent'] / 2**20:.1f} MiB sent ({final['mode']})")
    if final.get("phases"):
        from ..migration.source import MigrationProgress

        print(f"downtime: {MigrationProgress(phases=final['phases']).downtime_line()}")
    return 0


def _console(vm, replay: int) -> int:
    from .terminal import attach

    if replay < 0:
        raise UserError("--replay must be 0 or more")
    conn, history = vm.attach_console(replay)
    reason = attach(conn, vm.name, history)
    print(f"pyvmm: {vm.name}: {reason}", file=sys.stderr)
    return 0


def _print_list(infos) -> None:
    rows = [(info.name, info.state, str(info.pid or "-"), str(info.vcpus or "-"),
             f"{info.memory_mib} MiB" if info.memory_mib else "-") for info in infos]
    headers = ("Name", "State", "PID", "vCPUs", "Memory")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(" " + "   ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-" * (sum(widths) + 3 * len(widths)))
    for row in rows:
        print(" " + "   ".join(c.ljust(w) for c, w in zip(row, widths)))


def _print_info(info) -> None:
    rows = [("Name", info.name), ("State", info.state), ("PID", info.pid or "-"),
            ("vCPUs", info.vcpus), ("Memory", f"{info.memory_mib} MiB"),
            ("Persistent", "yes" if info.defined else "no"),
            ("Definition", info.definition or "-"), ("Run directory", info.run_dir)]
    if info.uptime_s is not None:
        rows.append(("Uptime", f"{info.uptime_s:.0f} s"))
    if info.outcome:
        rows.append(("Last outcome", f"{info.outcome['reason']}: {info.outcome['message']}"))
    for key, value in rows:
        print(f"{key + ':':<15} {value}")
