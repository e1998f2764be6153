"""`pyvmm top`: the running VMs, refreshed, like virt-top; `pyvmm top NAME`: one VM's exit
reasons and their rates, like kvm_stat.

Each refresh asks every running VM's API for /pyvmm/stats and shows the change since the
previous one: %CPU (the VM process's user+system time over the interval; 100% is one host
core), exits/s, resident memory. On a terminal the screen is redrawn and keys act: q quits,
c/e/m/n sort by CPU, exits, memory or name, x drills into the VM at the top (any key
returns). Elsewhere (a pipe, --iterations) each refresh is printed in turn.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from dataclasses import dataclass

SORT_KEYS = {"c": "cpu", "e": "exits", "m": "rss", "n": "name"}


@dataclass
class Row:
    name: str
    state: str
    pid: int | None
    vcpus: int
    cpu_percent: float | None
    exits_per_s: float | None
    rss_mib: float | None
    memory_mib: int | None
    exits: dict[str, int]
    exit_rates: dict[str, float]


class Sampler:
    """Stats of the running VMs, and their rates against the previous sample."""

    def __init__(self, host) -> None:
        self.host = host
        self._previous: dict[str, tuple[float, dict]] = {}

    def sample(self, only: str | None = None) -> list[Row]:
        rows = []
        now = time.monotonic()
        infos = [self.host.vm(only).info()] if only else self.host.list()
        for info in infos:
            if not info.active:
                continue
            try:
                stats = self.host.vm(info.name).stats()
            except Exception:  # noqa: BLE001 - a VM that stops mid-sample is left out of this one
                continue
            before = self._previous.get(info.name)
            self._previous[info.name] = (now, stats)
            cpu = exits = None
            rates: dict[str, float] = {}
            if before is not None and now > before[0]:
                interval, old = now - before[0], before[1]
                cpu = 100.0 * ((stats["cpu_user_s"] + stats["cpu_system_s"]) -
                               (old["cpu_user_s"] + old["cpu_system_s"])) / interval
                exits = (stats["exits_total"] - old["exits_total"]) / interval
                rates = {reason: (count - old["exits"].get(reason, 0)) / interval
                         for reason, count in stats["exits"].items()}
            rss = stats["rss_bytes"] / (1 << 20) if stats.get("rss_bytes") else None
            rows.append(Row(info.name, info.state, info.pid, stats["vcpu_count"], cpu, exits, rss,
                            info.memory_mib, stats["exits"], rates))
        return rows


def _number(value: float | None, width: int, digits: int = 1) -> str:
    return ("-" if value is None else f"{value:.{digits}f}").rjust(width)


def render(rows: list[Row], sort: str) -> str:
    keys = {"cpu": lambda r: -(r.cpu_percent or 0), "exits": lambda r: -(r.exits_per_s or 0),
            "rss": lambda r: -(r.rss_mib or 0), "name": lambda r: r.name}
    rows = sorted(rows, key=keys[sort])
    lines = [f"pyvmm top - {time.strftime('%H:%M:%S')}, {len(rows)} running, sorted by {sort}",
             f"{'NAME':<16} {'STATE':<8} {'PID':>7} {'VCPU':>4} {'%CPU':>6} {'EXITS/S':>9} {'RSS MiB':>8} {'MEM MiB':>8}"]
    for r in rows:
        lines.append(f"{r.name:<16.16} {r.state:<8} {r.pid or '-':>7} {r.vcpus:>4} {_number(r.cpu_percent, 6)} "
                     f"{_number(r.exits_per_s, 9, 0)} {_number(r.rss_mib, 8, 0)} {r.memory_mib or '-':>8}")
    return "\n".join(lines)


def render_exits(row: Row) -> str:
    lines = [f"pyvmm top - {row.name}: VM exits by reason ({row.state}, pid {row.pid})",
             f"{'REASON':<20} {'TOTAL':>12} {'PER SECOND':>11}"]
    for reason, total in sorted(row.exits.items(), key=lambda item: -row.exit_rates.get(item[0], 0)):
        lines.append(f"{reason:<20} {total:>12} {_number(row.exit_rates.get(reason), 11, 0)}")
    return "\n".join(lines)


def run(host, name: str | None, delay: float, iterations: int | None, sort: str) -> int:
    interactive = iterations is None and os.isatty(0) and os.isatty(1)
    sampler = Sampler(host)
    sampler.sample(name)  # the first sample only sets the baseline for the rates
    saved = termios.tcgetattr(0) if interactive else None
    if interactive:
        tty.setcbreak(0)
    drill, count = name, 0
    rows: list[Row] = []
    try:
        while iterations is None or count < iterations:
            key = _wait(delay, interactive)
            if key == "q":
                return 0
            if key in SORT_KEYS:
                sort = SORT_KEYS[key]
            elif key == "x" and rows and drill is None:
                drill = sorted(rows, key=lambda r: -(r.cpu_percent or 0))[0].name
            elif key and drill is not None and name is None:
                drill = None  # any other key leaves the drill-down
            rows = sampler.sample(drill)
            text = render_exits(rows[0]) if drill is not None and rows else render(rows, sort)
            if interactive:
                sys.stdout.write("\x1b[H\x1b[2J" + text.replace("\n", "\r\n") + "\r\n")
            else:
                print(text + "\n")
            sys.stdout.flush()
            count += 1
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
    return 0


def _wait(delay: float, interactive: bool) -> str | None:
    """The refresh interval: `delay` seconds, cut short by a key on a terminal (returned)."""
    if not interactive:
        time.sleep(delay)
        return None
    ready, _, _ = select.select([0], [], [], delay)
    return os.read(0, 1).decode(errors="replace") if ready else None
