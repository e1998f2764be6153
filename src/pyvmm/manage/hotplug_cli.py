"""virsh's hotplug verbs: attach-disk, detach-disk, attach-interface, detach-interface,
attach-device, detach-device (a definition fragment: drives, network-interfaces, vsock and
entropy in Firecracker's form, TOML or JSON; console ports and the balloon are refused). --live changes the running VM, --config the definition;
neither: the running VM if it runs, else the definition. Only virtio-pci devices can be
plugged into a running VM (virtio-mmio ones are found in ACPI tables built at boot)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

COMMANDS = ("attach-disk", "detach-disk", "attach-interface", "detach-interface", "attach-device", "detach-device",
            "setvcpus")


def register(command) -> None:
    """`command(name, help)` is manage.cli's parser factory (adds NAME)."""
    def where(parser, detach: bool = False) -> None:
        parser.add_argument("--live", action="store_true", help="change the running VM")
        parser.add_argument("--config", action="store_true", help="change the definition (kept across restarts)")
        if detach:
            parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                                help="how long to wait for the guest to eject the device (default 60)")
            parser.add_argument("--force", action="store_true",
                                help="unplug without waiting for the guest: its requests in flight are lost and "
                                     "data it has not written back with them")

    disk = command("attach-disk", "plug a raw disk image into a VM (PCI hotplug when it runs)")
    disk.add_argument("source", metavar="PATH", help="the raw image")
    disk.add_argument("--id", metavar="ID", help="its drive id (default: the first free diskN)")
    disk.add_argument("--readonly", action="store_true")
    where(disk)
    undisk = command("detach-disk", "unplug a disk (the running guest ejects it first)")
    undisk.add_argument("id", metavar="ID", help="the drive id")
    where(undisk, detach=True)
    nic = command("attach-interface", "plug a NIC into a VM (PCI hotplug when it runs)")
    nic.add_argument("--tap", default="auto", metavar="TAP",
                     help="the host TAP (default auto: a TAP in a network namespace of its own)")
    nic.add_argument("--mac", metavar="MAC")
    nic.add_argument("--id", metavar="ID", help="its interface id (default: the first free ethN)")
    where(nic)
    unnic = command("detach-interface", "unplug a NIC (the running guest ejects it first)")
    unnic.add_argument("id", metavar="ID", help="the interface id")
    where(unnic, detach=True)
    device = command("attach-device", "plug in the drives and network interfaces a definition fragment describes")
    device.add_argument("file", metavar="FILE", help="TOML or JSON with [[drives]], [[network-interfaces]], [vsock] "
                                                     "and/or [entropy]")
    where(device)
    undevice = command("detach-device", "unplug the drives and network interfaces a fragment names (by id)")
    undevice.add_argument("file", metavar="FILE")
    where(undevice, detach=True)
    vcpus = command("setvcpus", "plug vCPUs into a running VM or take them out (up to its max_vcpus)")
    vcpus.add_argument("count", metavar="COUNT", type=int)
    vcpus.add_argument("--live", action="store_true", help="change the running VM")
    vcpus.add_argument("--config", action="store_true", help="change the definition's vcpu_count")
    vcpus.add_argument("--timeout", type=int, default=60, metavar="SECONDS",
                       help="how long to wait for the guest to eject each vCPU removed (default 60)")


def run(name: str, vm, args) -> int:
    where = {"live": args.live, "config": args.config}
    if name == "setvcpus":
        _check_timeout(args.timeout)
        if args.count < 1:
            raise UserError(f"setvcpus: {args.count}: a VM keeps at least its boot CPU (1)")
        vm.set_vcpus(args.count, timeout=args.timeout, **where)
        print(f"Domain '{vm.name}': {args.count} vCPUs")
        return 0
    if name == "attach-disk":
        done = [vm.attach_disk(args.source, drive_id=args.id, readonly=args.readonly, **where)]
    elif name == "attach-interface":
        done = [vm.attach_interface(args.tap, iface_id=args.id, mac=args.mac, **where)]
    elif name == "attach-device":
        done = vm.attach_device(_fragment(args.file), **where)
    else:
        _check_timeout(args.timeout)
        if name == "detach-disk":
            vm.detach_disk(args.id, timeout=args.timeout, force=args.force, **where)
            done = [args.id]
        elif name == "detach-interface":
            vm.detach_interface(args.id, timeout=args.timeout, force=args.force, **where)
            done = [args.id]
        else:
            fragment = _fragment(args.file)
            vm.detach_device(fragment, timeout=args.timeout, force=args.force, **where)
            done = [item.get("drive_id") or item.get("iface_id") for section in ("drives", "network-interfaces")
                    for item in fragment.get(section, [])] + [single for single in ("vsock", "entropy") if single in fragment]
    verb = "attached" if name.startswith("attach") else "detached"
    print(f"Domain '{vm.name}': {', '.join(done)} {verb}")
    return 0


def _check_timeout(timeout: float) -> None:
    if not 0 < timeout <= 3600:
        raise UserError(f"--timeout must be more than 0 and at most 3600 seconds (got {timeout:g})")


def _fragment(path: str):
    from .definitions import parse

    file = Path(path)
    if file.suffix not in (".toml", ".json"):
        raise UserError(f"{path}: a device fragment is a .toml or .json file")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, file.suffix, path)
