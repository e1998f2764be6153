"""The parts of benchmarks/tools_io.py and boot.py's console row that need no VM and no timing:
the guest script fits the kernel command line, the host's iperf3 report is read for the right
direction, and the console row accepts only the whole sequence, in order."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.append(str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other by name
import boot  # noqa: E402
import tools_io  # noqa: E402

from pyvmm.images import encode_command  # noqa: E402


@pytest.mark.parametrize("seconds", [1, 10, 99_999])
def test_the_guest_script_fits_the_kernel_command_line(seconds):
    script = tools_io.guest_script(seconds)
    encode_command(["sh", "-c", script])        # raises ImageError when too long
    assert f"--runtime={seconds}" in script and f"-t {seconds}" in script


def iperf3_report(path: pathlib.Path, sent: int, received: int, seconds: float) -> pathlib.Path:
    path.write_text(json.dumps({"end": {"sum_sent": {"bytes": sent, "seconds": seconds},
                                        "sum_received": {"bytes": received, "seconds": seconds}}}))
    return path


def test_the_host_servers_figure_is_what_it_received_or_sent(tmp_path):
    # guest -> host: the server received; host -> guest (-R): the server sent
    assert tools_io.server_rate("tx", iperf3_report(tmp_path / "tx.json", 0, 20_000_000, 2.0)) == (10.0, 2.0)
    assert tools_io.server_rate("rx", iperf3_report(tmp_path / "rx.json", 30_000_000, 0, 3.0)) == (10.0, 3.0)
    with pytest.raises(tools_io.BenchError, match="moved no data"):
        tools_io.server_rate("tx", iperf3_report(tmp_path / "none.json", 5, 0, 2.0))
    (tmp_path / "err.json").write_text(json.dumps({"error": "unable to start listener"}))
    with pytest.raises(tools_io.BenchError, match="unable to start listener"):
        tools_io.server_rate("tx", tmp_path / "err.json")
    with pytest.raises(tools_io.BenchError, match="no report"):
        tools_io.server_rate("rx", tmp_path / "missing.json")


def console_run(lines: list[bytes]) -> boot.Run:
    return boot.Run(0, 0, 0, 0, 0, 0, [(float(i), line + b"\r\n") for i, line in enumerate(lines)], 0)


CONFIG = boot.Config("test", "pyvmm", lambda guest, fd: [], lambda guest: [])


def test_the_console_row_times_the_whole_sequence():
    sequence = [str(i).encode() for i in range(1, 6)]
    run = console_run([b"booting", boot.CONSOLE_START, *sequence, boot.CONSOLE_END, b"pyvmm: exit status 0"])
    assert boot.console_seconds(run, 5, CONFIG) == 6.0     # host times of the START and END lines
    assert boot.console_bytes(5) == len(b"1\n2\n3\n4\n5\n")


@pytest.mark.parametrize("broken", [
    [b"1", b"2", b"4", b"5"],               # a line lost
    [b"1", b"3", b"2", b"4", b"5"],         # out of order
    [b"1", b"2", b"3", b"4", b"5", b"6"],   # more than asked for
])
def test_the_console_row_refuses_output_that_is_not_the_sequence(broken):
    run = console_run([boot.CONSOLE_START, *broken, boot.CONSOLE_END])
    with pytest.raises(SystemExit, match="did not show `seq 1 5`"):
        boot.console_seconds(run, 5, CONFIG)
