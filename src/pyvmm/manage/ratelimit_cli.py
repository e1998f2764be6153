"""`pyvmm ratelimit VM DEVICE [...]`: show or change a running VM's I/O rate limits.

DEVICE is a drive_id or an iface_id of the VM's configuration. Rates are per second (a bucket
of one second's worth, refilled over 1000 ms), with K, M, G suffixes (binary); 0 removes that
limit. Options a device does not have are refused. With no option it prints the limits in force.

    pyvmm ratelimit web rootfs --bps 10M --iops 500
    pyvmm ratelimit web eth0 --rx-bps 1M --tx-pps 2000
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError

DRIVE_OPTIONS = ("bps", "iops")
NET_OPTIONS = ("rx_bps", "rx_pps", "tx_bps", "tx_pps")


def register(command) -> None:
    parser = command("ratelimit", "show or change a running VM's disk or NIC rate limits (token buckets)",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", metavar="DEVICE", help="a drive_id or iface_id of the VM")
    for option, what in (("bps", "disk bytes/s"), ("iops", "disk requests/s"), ("rx-bps", "bytes/s the guest "
                         "receives"), ("rx-pps", "packets/s the guest receives"), ("tx-bps", "bytes/s the guest "
                         "sends"), ("tx-pps", "packets/s the guest sends")):
        parser.add_argument(f"--{option}", metavar="RATE", help=f"{what} (0: no limit)")


def run(vm, args) -> int:
    from ..config import parse_rate

    config = vm.config()
    drives = {d["drive_id"]: d for d in config.get("drives", [])}
    ifaces = {n["iface_id"]: n for n in config.get("network-interfaces", [])}
    if args.device not in drives and args.device not in ifaces:
        known = ", ".join([*drives, *ifaces]) or "none"
        raise UserError(f"{vm.name} has no drive or network interface {args.device!r} (it has: {known})")
    is_drive = args.device in drives
    allowed, other = (DRIVE_OPTIONS, NET_OPTIONS) if is_drive else (NET_OPTIONS, DRIVE_OPTIONS)
    given = {name: getattr(args, name) for name in (*DRIVE_OPTIONS, *NET_OPTIONS) if getattr(args, name) is not None}
    wrong = [name for name in given if name in other]
    if wrong:
        what = "drive" if is_drive else "network interface"
        raise UserError(f"--{wrong[0].replace('_', '-')} is not for a {what} (use "
                        f"{', '.join('--' + n.replace('_', '-') for n in allowed)})")
    rates = {name: parse_rate(value, f"--{name.replace('_', '-')}") for name, value in given.items()}
    if rates:
        if is_drive:
            vm.set_rate_limit(args.device, rate_limiter=_buckets(rates.get("bps"), rates.get("iops")))
        else:
            changes = {f"{side}_rate_limiter": _buckets(rates.get(f"{side}_bps"), rates.get(f"{side}_pps"))
                       for side in ("rx", "tx") if f"{side}_bps" in rates or f"{side}_pps" in rates}
            vm.set_rate_limit(args.device, **changes)
        config = vm.config()
        drives = {d["drive_id"]: d for d in config.get("drives", [])}
        ifaces = {n["iface_id"]: n for n in config.get("network-interfaces", [])}
    if is_drive:
        print(f"{args.device}: {describe(drives[args.device].get('rate_limiter'), 'requests')}")
    else:
        for side, what in (("rx", "receive"), ("tx", "send")):
            print(f"{args.device} {what}: {describe(ifaces[args.device].get(f'{side}_rate_limiter'), 'packets')}")
    return 0


def _buckets(nbytes: int | None, ops: int | None) -> dict[str, Any]:
    """The PATCH body's buckets for the rates given (one second's worth; size 0 removes one)."""
    body: dict[str, Any] = {}
    for name, rate in (("bandwidth", nbytes), ("ops", ops)):
        if rate is not None:
            body[name] = {"size": rate, "refill_time": 1000 if rate else 0}
    return body


def describe(limiter: dict[str, Any] | None, ops_unit: str) -> str:
    parts = []
    for name, unit in (("bandwidth", "bytes"), ("ops", ops_unit)):
        bucket = (limiter or {}).get(name)
        if bucket and bucket.get("size") and bucket.get("refill_time"):
            rate = bucket["size"] * 1000 / bucket["refill_time"]
            burst = f" (+{bucket['one_time_burst']} once)" if bucket.get("one_time_burst") else ""
            parts.append(f"{_amount(rate, unit)}/s, bucket {_amount(bucket['size'], unit)}{burst}")
    return "; ".join(parts) or "no limit"


def _amount(value: float, unit: str) -> str:
    """10485760 bytes -> '10 MiB'; counts of other units as they are."""
    if unit == "bytes":
        for shift, prefix in ((30, "Gi"), (20, "Mi"), (10, "Ki")):
            if value >= 1 << shift and value % (1 << shift) == 0:
                return f"{int(value) >> shift} {prefix}B"
        return f"{value:g} B"
    return f"{value:g} {unit}"
