"""The parts of benchmarks/net_counts.py that need no VM and no timing: the guest script fits the
kernel command line, the guest's counter lines are read as printed, and the per-KiB figures are
the differences between two checkpoints."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.append(str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other by name
import net_counts  # noqa: E402

from pyvmm.images import encode_command  # noqa: E402


@pytest.mark.parametrize("mib", [1, 8, 4096])
def test_the_guest_script_fits_the_kernel_command_line(mib):
    script = net_counts.guest_script(mib)
    encode_command(["sh", "-c", script])        # raises ImageError when too long
    assert f"count={mib * 16} " in script


def checkpoint(point: int, rx: int, tx: int, irq_in: int, irq_out: int, idle: int, busy: int, acks: int) -> bytes:
    """The lines `c POINT` prints in the guest (eth0 rx/tx packets, then the interrupts, then /proc/stat)."""
    return (f"@@C {point} {rx} {tx} {irq_in} {irq_out} cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\r\n"
            f"@@N {point} TcpExt: TCPHPAcks TCPPureAcks TCPAutoCorking\r\n"
            f"@@N {point} TcpExt: {acks} 1 2\r\n").encode()


def test_counters_are_read_per_checkpoint_and_turned_into_per_kib_figures():
    console = (b"[    1.0] booting\r\n" + checkpoint(0, 10, 20, 3, 4, 100, 50, 5)
               + checkpoint(1, 10 + 512, 20 + 1024, 3 + 256, 4 + 512, 100, 50 + 300, 5 + 511)
               + checkpoint(2, 10 + 512 + 64, 20 + 1024 + 32, 3 + 256 + 16, 4 + 512 + 8, 100 + 30, 350 + 270, 516)
               + b"@@R 1048576\r\n")
    points, received = net_counts.parse(console)
    assert received == 1 << 20 and sorted(points) == [0, 1, 2]
    assert points[1]["tx_packets"] == 1044 and points[1]["TCPHPAcks"] == 516 and points[1]["TCPPureAcks"] == 1
    run = {"points": points, "rates": {"tx": 1.5, "rx": 2.5}, "host": {"tx": (0.512, 2048, 1024), "rx": None}}
    figures = net_counts.per_kib(run, mib=1)
    tx, rx = figures["tx"], figures["rx"]
    assert tx["data packets"] == 1.0 and tx["bytes per data packet"] == 1024
    assert tx["packets the other way"] == 0.5 and tx["TCP ACKs received"] == 511 / 1024
    assert tx["interrupts (input + output)"] == 768 / 1024 and tx["guest CPU idle %"] == 0
    assert tx["VMM CPU ms"] == 0.5 and tx["VMM context switches"] == 3.0 and tx["  of them involuntary"] == 1.0
    assert rx["data packets"] == 64 / 1024 and rx["packets the other way"] == 32 / 1024
    assert rx["guest CPU idle %"] == 10 and "VMM CPU ms" not in rx and rx["MB/s (host clock)"] == 2.5
