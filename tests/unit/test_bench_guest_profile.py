"""The parts of benchmarks/guest_profile.py that need no VM: the guest script fits the kernel
command line, its stats lines are read, and /proc/profile's buckets land on their functions."""

from __future__ import annotations

import pathlib
import struct
import sys

import pytest

sys.path.append(str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other by name
import guest_profile  # noqa: E402

from pyvmm.images import encode_command  # noqa: E402


@pytest.mark.parametrize("seconds", [1, 8, 99_999])
def test_the_guest_script_fits_the_kernel_command_line(seconds):
    script = guest_profile.guest_script(seconds)
    encode_command(["sh", "-c", script])        # raises ImageError when too long
    assert f"p {seconds} " in script and "/proc/profile" in script


def test_a_stats_line_gives_jiffies_idle_frames_and_interrupts():
    line = (b"cpu  30 0 157 37 5 0 12 1 0 0 | eth0:  478217    7239    0    0    0     0          0         0 "
            b"535227843    8858    0    0    0     0       0          0 | 36:        515   PCI-MSI 49153-edge      "
            b"virtio2-input.0")
    assert guest_profile.parse_stats(line) == {"jiffies": 30 + 157 + 37 + 5 + 12 + 1, "idle": 42,
                                               "rx_bytes": 478217, "rx_packets": 7239, "rx_interrupts": 515}


def test_profile_buckets_land_on_their_functions(tmp_path):
    system_map = tmp_path / "System.map"
    system_map.write_text("ffffffff81000000 T _stext\nffffffff81000000 T startup_64\n"
                          "ffffffff81000040 t helper\nffffffff81000080 D some_data\nffffffff810000a0 T idle\n")
    symbols = guest_profile.kernel_symbols(system_map)
    # step 16: buckets 0-3 startup_64, 4-9 helper (the D symbol is not text), 10 idle; the last: modules
    counts = [0] * 13
    counts[1], counts[4], counts[9], counts[10], counts[12] = 2, 3, 1, 7, 5
    raw = struct.pack(f"<{1 + len(counts)}I", 16, *counts)
    assert guest_profile.profile_by_function(raw, symbols) == {"startup_64": 2, "helper": 4, "idle": 7,
                                                               "(modules)": 5}


def test_the_summary_divides_by_the_interval():
    before = {"jiffies": 100, "idle": 10, "rx_bytes": 0, "rx_packets": 0, "rx_interrupts": 0}
    after = {"jiffies": 900, "idle": 410, "rx_bytes": 6_400_000, "rx_packets": 100, "rx_interrupts": 25}
    got = guest_profile.summary(320.0, before, after, {"native_safe_halt": 30, "other": 70}, 8)
    assert got["guest idle, /proc/stat (%)"] == 50.0 and got["kernel ticks in native_safe_halt (%)"] == 30.0
    assert got["frames received per second"] == 12.5 and got["bytes per frame"] == 64_000
    assert got["frames per RX interrupt"] == 4.0 and got["MB/s host -> guest"] == 320.0
