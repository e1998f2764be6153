"""`pyvmm setmem NAME SIZE` (virsh's verb: the balloon leaves the guest SIZE of its memory) and
`pyvmm mem stats NAME` (resident, merged, ballooned, the guest's free memory)."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError


def register(command) -> None:
    """`command(name, help)` is manage.cli's parser factory (adds NAME)."""
    setmem = command("setmem", "set the balloon so that the guest keeps SIZE of its memory (virsh setmem)")
    # REMAINDER: a negative size ('-5M') reaches the check below for a one-line refusal instead
    # of being taken for an option
    setmem.add_argument("size", metavar="SIZE", nargs=argparse.REMAINDER,
                        help="e.g. 192M or 1G (MiB without a unit); at most the guest's memory")


def balloon_section(text: str) -> dict:
    """`--balloon amount=MIB,deflate-on-oom,...` (pyvmm run's syntax) as a definition's [balloon]."""
    from ..config import BalloonConfig, ConfigError

    try:
        balloon = BalloonConfig.parse(text)
    except ConfigError as exc:
        raise UserError(f"--balloon {exc.render(exc.field.split('.')[-1]) if exc.field else exc.detail}") from None
    return {"amount_mib": balloon.amount_mib, "deflate_on_oom": balloon.deflate_on_oom,
            "stats_polling_interval_s": balloon.stats_interval_s, "free_page_reporting": balloon.free_page_reporting}


def setmem(vm, args) -> int:
    from ..config import parse_size

    if len(args.size) != 1:
        raise UserError("setmem takes NAME SIZE (e.g. pyvmm setmem vm1 192M)")
    text = args.size[0]
    if text.strip().startswith("-"):
        raise UserError(f"invalid size {text!r}: the memory size cannot be negative")
    size = parse_size(text, None)
    amount = vm.set_memory(size)
    print(f"Domain '{vm.name}': balloon target {amount} MiB (the guest keeps {size >> 20} MiB)")
    return 0


def print_memory_stats(vm, as_json: bool) -> int:
    stats = vm.memory_stats()
    if as_json:
        print(json.dumps(stats, indent=2))
        return 0
    for key, value in stats.items():
        shown = f"{value / 2**20:.1f} MiB" if key.endswith("_bytes") and isinstance(value, int) else \
            "-" if value is None else value
        print(f"{key + ':':<28} {shown}")
    return 0
