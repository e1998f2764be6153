"""`pyvmm top` without a terminal: rates from stats samples, the keys, the screens and the
ANSI redraw are pure functions (a fake host; no VM)."""

from __future__ import annotations

from pyvmm.manage import top
from pyvmm.manage.top import Sampler, View, handle_key, redraw, screen


class Info:
    def __init__(self, name: str, pid: int) -> None:
        self.name, self.pid, self.state, self.active, self.memory_mib = name, pid, "running", True, 256


def stats(cpu: float, exits: dict[str, int], *, rss: int = 64 << 20, blk: tuple[int, int] = (0, 0),
          net: tuple[int, int] = (0, 0), resident: int = 32 << 20) -> dict:
    devices = {"disk0": {"kind": "VirtioBlock", "requests": 1, "malformed_chains": 0, "ring_failures": 0,
                         "needs_reset": False, "bytes_read": blk[0], "bytes_written": blk[1]},
               "eth0": {"kind": "VirtioNet", "requests": 1, "malformed_chains": 0, "ring_failures": 0,
                        "needs_reset": False, "rx_bytes": net[0], "tx_bytes": net[1]}}
    return {"cpu_user_s": cpu, "cpu_system_s": 0.0, "exits": exits, "exits_total": sum(exits.values()),
            "rss_bytes": rss, "vcpu_count": 1, "exits_source": "software-cpu", "devices": devices,
            "memory": {"guest_ram_bytes": 256 << 20, "guest_ram_resident_bytes": resident}}


def two_samples() -> list[top.Row]:
    sampler = Sampler(host=None)
    first = sampler.rows_from([(Info("a", 101), stats(1.0, {"mmio": 100})),
                               (Info("bb", 102), stats(5.0, {"mmio": 10, "halts": 0}))], now=10.0)
    assert [row.cpu_percent for row in first] == [None, None]  # no rate before a second sample
    return sampler.rows_from([(Info("a", 101), stats(2.0, {"mmio": 300}, blk=(4 << 20, 2 << 20))),
                              (Info("bb", 102), stats(5.5, {"mmio": 10, "halts": 40}, net=(3000, 1000)))], now=12.0)


def test_rates_come_from_the_change_between_samples():
    rows = {row.name: row for row in two_samples()}
    a, bb = rows["a"], rows["bb"]
    assert a.cpu_percent == 50.0 and a.exits_per_s == 100.0
    assert (a.block_read_bps, a.block_write_bps, a.net_rx_bps) == (2 << 20, 1 << 20, 0.0)
    assert (bb.net_rx_bps, bb.net_tx_bps) == (1500.0, 500.0)
    assert bb.exit_rates == {"mmio": 0.0, "halts": 20.0}
    assert a.guest_resident_mib == 32.0 and a.rss_mib == 64.0


def test_table_has_virt_tops_columns_sorted_and_the_selection_marked():
    rows = two_samples()
    lines = screen(View(sort="exits", selected=1), rows, clock="12:00:00").splitlines()
    assert lines[0].startswith("pyvmm top - 12:00:00, 2 running, sorted by exits")
    assert lines[1].split() == ["ID", "NAME", "STATE", "VCPU", "%CPU", "EXITS/S", "RES", "MiB", "RSS", "MiB", "MEM",
                                "MiB", "BLK", "RD/S", "BLK", "WR/S", "NET", "RX/S", "NET", "TX/S"]
    assert lines[2].split() == ["101", "a", "running", "1", "50.0", "100", "32", "64", "256", "2.0M", "1.0M", "0", "0"]
    assert lines[3].startswith(">") and lines[3].split()[1:3] == ["102", "bb"]  # row 1 selected
    by_net = screen(View(sort="net"), rows).splitlines()
    assert by_net[2].split()[:3] == [">", "102", "bb"] and by_net[2].split()[-2:] == ["1.5K", "500"]


def test_keys_sort_select_drill_back_and_quit():
    rows = two_samples()  # by %CPU: a (50%) then bb (25%)
    view = View()
    assert handle_key(view, "e", rows) == View(sort="exits")
    assert handle_key(view, "i", rows).sort == "net" and handle_key(view, "b", rows).sort == "block"
    down = handle_key(view, "j", rows)
    assert down.selected == 1 and handle_key(down, "\x1b[B", rows).selected == 1  # stops at the last row
    assert handle_key(down, "\x1b[A", rows).selected == 0
    drilled = handle_key(down, "x", rows)
    assert drilled.drill == "bb" and handle_key(down, "\r", rows).drill == "bb"
    exits = screen(drilled, rows).splitlines()
    assert exits[0] == "pyvmm top - bb: VM exits by reason (running, pid 102, from software-cpu)"
    assert exits[2].split() == ["halts", "40", "20"] and exits[3].split() == ["mmio", "10", "0"]
    assert handle_key(drilled, "z", rows).drill is None  # any key goes back
    assert handle_key(drilled, "q", rows) is None and handle_key(view, "q", rows) is None
    assert handle_key(view, "?", rows) == view
    assert "not running" in screen(View(drill="gone"), rows)


def test_redraw_rewrites_in_place_and_fits_the_terminal():
    text = "one\ntwo\nthree"
    assert redraw(text, 24) == "\x1b[Hone\x1b[K\r\ntwo\x1b[K\r\nthree\x1b[K\x1b[J"
    assert redraw(text, 2) == "\x1b[Hone\x1b[K\r\ntwo\x1b[K\x1b[J"
    assert redraw(text, 0) == redraw(text, 24)  # a terminal that gives no size: nothing cut


def test_on_a_terminal_it_redraws_in_the_alternate_screen_and_q_quits(tmp_path):
    """The real command in a pseudo-terminal (as over ssh), no VM running: the screen is drawn,
    j is taken, q ends it with status 0 and the terminal's screen and cursor are given back."""
    import os
    import pty
    import select
    import sys
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: `pyvmm top` with empty private directories
        os.environ.update(XDG_RUNTIME_DIR=str(tmp_path / "rt"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
        os.execv(sys.executable, [sys.executable, "-m", "pyvmm.cli", "top", "--delay", "0.2"])
    output, deadline, keys = b"", time.monotonic() + 60, [b"j", b"q"]
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                output += os.read(fd, 65536)
            except OSError:  # the child has ended and closed the terminal
                break
        if keys and output.count(b"pyvmm top - ") >= 2:
            os.write(fd, keys.pop(0))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-500:]
    assert output.startswith(b"\x1b[?1049h\x1b[?25l\x1b[H") and output.endswith(b"\x1b[?25h\x1b[?1049l")
    assert b"0 running, sorted by cpu" in output and b"NAME" in output and b"EXITS/S" in output
