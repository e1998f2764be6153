"""`pyvmm top`: the running VMs, refreshed, like virt-top; drill into one for its exit reasons
and their rates, like kvm_stat.

Each refresh asks every running VM's API for /pyvmm/stats and shows the change since the
previous one: %CPU (the VM process's user+system time over the interval; 100% is one host
core), exits/s, block and network bytes/s (its virtio-blk and virtio-net counters), guest RAM
resident and the process's RSS.

On a terminal (also over ssh) the screen is redrawn in place with plain ANSI sequences (the
alternate screen, cursor home, erase to end of line), and keys act at once:
  q quit    c e m n b i  sort by %CPU, exits/s, memory, name, block I/O, net I/O
  j k (or the arrows) move the selection    x or Enter: the selected VM's exit reasons
  in the exit view, any key but q goes back.
Elsewhere (a pipe, --iterations) each refresh is printed in turn. What is shown is made by
pure functions (Sampler.rows_from, handle_key, render): tested without a terminal.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from dataclasses import dataclass, replace
from typing import Any

SORT_KEYS = {"c": "cpu", "e": "exits", "m": "mem", "n": "name", "b": "block", "i": "net"}
_SORTS = {"cpu": lambda r: -(r.cpu_percent or 0), "exits": lambda r: -(r.exits_per_s or 0),
          "mem": lambda r: -(r.rss_mib or 0), "name": lambda r: r.name,
          "block": lambda r: -((r.block_read_bps or 0) + (r.block_write_bps or 0)),
          "net": lambda r: -((r.net_rx_bps or 0) + (r.net_tx_bps or 0))}
UP, DOWN = ("k", "\x1b[A", "\x1bOA"), ("j", "\x1b[B", "\x1bOB")


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
    guest_resident_mib: float | None = None
    block_read_bps: float | None = None
    block_write_bps: float | None = None
    net_rx_bps: float | None = None
    net_tx_bps: float | None = None
    exits_source: str | None = None


@dataclass(frozen=True)
class View:
    """What the screen shows: the sort order, the selected row, and the VM drilled into."""
    sort: str = "cpu"
    selected: int = 0
    drill: str | None = None


def io_totals(stats: dict) -> dict[str, int]:
    """Bytes moved by the VM's block and network devices (their models' own counters)."""
    totals = {"block_read": 0, "block_write": 0, "net_rx": 0, "net_tx": 0}
    for device in (stats.get("devices") or {}).values():
        for key, counter in (("block_read", "bytes_read"), ("block_write", "bytes_written"),
                             ("net_rx", "rx_bytes"), ("net_tx", "tx_bytes")):
            value = device.get(counter)
            if isinstance(value, int) and not isinstance(value, bool):
                totals[key] += value
    return totals


class Sampler:
    """Stats of the running VMs, and their rates against the previous sample."""

    def __init__(self, host) -> None:
        self.host = host
        self._previous: dict[str, tuple[float, dict]] = {}

    def sample(self, only: str | None = None) -> list[Row]:
        infos = [self.host.vm(only).info()] if only else self.host.list()
        samples = []
        for info in infos:
            if not info.active:
                continue
            try:
                samples.append((info, self.host.vm(info.name).stats()))
            except Exception:  # noqa: BLE001 - a VM that stops mid-sample is left out of this one
                continue
        return self.rows_from(samples, time.monotonic())

    def rows_from(self, samples: list[tuple[Any, dict]], now: float) -> list[Row]:
        """Rows for (info, stats) pairs taken at `now`; rates against the previous call's."""
        rows = []
        for info, stats in samples:
            name = info.name
            before = self._previous.get(name)
            self._previous[name] = (now, stats)
            row = Row(name, info.state, info.pid, stats["vcpu_count"], None, None,
                      stats["rss_bytes"] / (1 << 20) if stats.get("rss_bytes") else None,
                      info.memory_mib, stats["exits"], {}, exits_source=stats.get("exits_source"))
            memory = stats.get("memory") or {}
            if memory.get("guest_ram_resident_bytes") is not None:
                row.guest_resident_mib = memory["guest_ram_resident_bytes"] / (1 << 20)
            if before is not None and now > before[0]:
                interval, old = now - before[0], before[1]
                row.cpu_percent = 100.0 * ((stats["cpu_user_s"] + stats["cpu_system_s"]) -
                                           (old["cpu_user_s"] + old["cpu_system_s"])) / interval
                row.exits_per_s = (stats["exits_total"] - old["exits_total"]) / interval
                row.exit_rates = {reason: (count - old["exits"].get(reason, 0)) / interval
                                  for reason, count in stats["exits"].items()}
                new_io, old_io = io_totals(stats), io_totals(old)
                row.block_read_bps, row.block_write_bps, row.net_rx_bps, row.net_tx_bps = (
                    (new_io[key] - old_io[key]) / interval for key in ("block_read", "block_write", "net_rx", "net_tx"))
            rows.append(row)
        return rows


def sorted_rows(rows: list[Row], sort: str) -> list[Row]:
    return sorted(rows, key=_SORTS[sort])


def handle_key(view: View, key: str, rows: list[Row]) -> View | None:
    """The view after `key` (None: quit). `rows` as they are shown (for the selection)."""
    if key == "q":
        return None
    if view.drill is not None:
        return replace(view, drill=None)  # any other key leaves the exit view
    if key in SORT_KEYS:
        return replace(view, sort=SORT_KEYS[key], selected=0)
    last = max(len(rows) - 1, 0)
    if key in UP:
        return replace(view, selected=max(view.selected - 1, 0))
    if key in DOWN:
        return replace(view, selected=min(view.selected + 1, last))
    if key in ("x", "\r", "\n") and rows:
        return replace(view, drill=sorted_rows(rows, view.sort)[min(view.selected, last)].name)
    return view


def _number(value: float | None, width: int, digits: int = 1) -> str:
    return ("-" if value is None else f"{value:.{digits}f}").rjust(width)


def _rate(value: float | None, width: int) -> str:
    """Bytes per second, short: 512, 12K, 3.4M."""
    if value is None:
        return "-".rjust(width)
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}".rjust(width)
    return f"{value:.0f}".rjust(width)


HEADER = (f"{'ID':>7} {'NAME':<16} {'STATE':<8} {'VCPU':>4} {'%CPU':>6} {'EXITS/S':>9} {'RES MiB':>7} "
          f"{'RSS MiB':>7} {'MEM MiB':>7} {'BLK RD/S':>8} {'BLK WR/S':>8} {'NET RX/S':>8} {'NET TX/S':>8}")


def render(rows: list[Row], sort: str, selected: int | None = None, clock: str | None = None) -> str:
    """The VM table (virt-top's columns: ID is the VM's pid; RES is guest RAM resident, RSS the
    whole process, MEM the guest RAM configured), sorted; `selected` marked with '>'."""
    rows = sorted_rows(rows, sort)
    lines = [f"pyvmm top - {clock or time.strftime('%H:%M:%S')}, {len(rows)} running, sorted by {sort}  "
             f"(q quit, c/e/m/n/b/i sort, j/k select, x exits)", " " + HEADER]
    for index, r in enumerate(rows):
        mark = ">" if index == selected else " "
        lines.append(f"{mark}{r.pid or '-':>7} {r.name:<16.16} {r.state:<8} {r.vcpus:>4} {_number(r.cpu_percent, 6)} "
                     f"{_number(r.exits_per_s, 9, 0)} {_number(r.guest_resident_mib, 7, 0)} "
                     f"{_number(r.rss_mib, 7, 0)} {r.memory_mib or '-':>7} {_rate(r.block_read_bps, 8)} "
                     f"{_rate(r.block_write_bps, 8)} {_rate(r.net_rx_bps, 8)} {_rate(r.net_tx_bps, 8)}")
    return "\n".join(lines)


def render_exits(row: Row) -> str:
    """One VM's exits by reason, busiest first (kvm_stat's view)."""
    source = f", from {row.exits_source}" if row.exits_source else ""
    lines = [f"pyvmm top - {row.name}: VM exits by reason ({row.state}, pid {row.pid}{source})",
             f"{'REASON':<20} {'TOTAL':>12} {'PER SECOND':>11}"]
    for reason, total in sorted(row.exits.items(), key=lambda item: (-row.exit_rates.get(item[0], 0), -item[1])):
        lines.append(f"{reason:<20} {total:>12} {_number(row.exit_rates.get(reason), 11, 0)}")
    return "\n".join(lines)


def screen(view: View, rows: list[Row], clock: str | None = None) -> str:
    """The text of one refresh for `view`."""
    if view.drill is not None:
        drilled = [row for row in rows if row.name == view.drill]
        return render_exits(drilled[0]) if drilled else f"pyvmm top - {view.drill} is not running (any key: back)"
    return render(rows, view.sort, view.selected, clock)


def redraw(text: str, height: int) -> str:
    """ANSI for replacing the screen with `text` in place: home, each line then erase to its
    end, erase below (no clear, so no flicker over a slow link); cut to the terminal's height
    (0: a terminal that does not say, e.g. a fresh pty: nothing is cut)."""
    lines = text.split("\n")
    if height > 0:
        lines = lines[:height]
    return "\x1b[H" + "".join(line + "\x1b[K\r\n" for line in lines[:-1]) + lines[-1] + "\x1b[K\x1b[J"


def run(host, name: str | None, delay: float, iterations: int | None, sort: str) -> int:
    interactive = iterations is None and os.isatty(0) and os.isatty(1)
    sampler = Sampler(host)
    sampler.sample(name)  # the first sample only sets the baseline for the rates
    view = View(sort=sort, drill=name)
    saved = termios.tcgetattr(0) if interactive else None
    if interactive:
        tty.setcbreak(0)
        sys.stdout.write("\x1b[?1049h\x1b[?25l")  # the alternate screen, no cursor
    count, rows = 0, list[Row]()
    try:
        while iterations is None or count < iterations:
            key = _wait(delay, interactive)
            if key:
                following = handle_key(view, key, rows)
                if following is None:
                    return 0
                if name is not None and following.drill is None:
                    following = replace(following, drill=name)  # `top NAME` shows that VM only
                view = following
            rows = sampler.sample(view.drill)
            text = screen(view, rows)
            if interactive:
                sys.stdout.write(redraw(text, os.get_terminal_size(1).lines))
            else:
                print(text + "\n")
            sys.stdout.flush()
            count += 1
    finally:
        if saved is not None:
            sys.stdout.write("\x1b[?25h\x1b[?1049l")
            sys.stdout.flush()
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
    return 0


def _wait(delay: float, interactive: bool) -> str | None:
    """The refresh interval: `delay` seconds, cut short by a key on a terminal (returned; an
    arrow key's whole escape sequence comes in one read)."""
    if not interactive:
        time.sleep(delay)
        return None
    ready, _, _ = select.select([0], [], [], delay)
    return os.read(0, 8).decode(errors="replace") if ready else None
