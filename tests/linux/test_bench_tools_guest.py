"""The benchmark tools disk (benchmarks/guest_tools.py, used by benchmarks/tools_io.py) in the
default guest: Debian's fio and iperf3, with the libraries the disk ships, run there and measure
something. The disk is built from Debian packages on first use (apt-get download) and cached."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

sys.path.append(str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other by name
from guest_tools import GUEST_SETUP, TOOLS_SERIAL, tools_image  # noqa: E402


@pytest.fixture(scope="session")
def tools_disk():
    return tools_image(progress=None)


def test_fio_and_iperf3_from_the_tools_disk_run_in_the_default_guest(pyvmm, tools_disk, tmp_path):
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(bytes(8 << 20))
    script = ('f(){ echo "FAILED: $*";exit 1;}\n' + GUEST_SETUP +
              "B=$(s scratch);[ -n \"$B\" ]||f no scratch disk\n"
              "fio --name=t --filename=$B --rw=randread --bs=4k --direct=1 --ioengine=libaio --time_based "
              "--runtime=1 --output-format=terse >/tmp/o||f fio\n"
              "awk -F';' '{print \"FIO\",$3,$5,$8}' /tmp/o\n"
              "ip link set lo up;iperf3 -s -1 -D -p 5201||f iperf3 -s;sleep 1\n"
              "iperf3 -c 127.0.0.1 -p 5201 -t 1 -f k|grep receiver||f iperf3 -c\n")
    result = pyvmm("run", "--timeout", "300", "--disk", f"{scratch},serial=scratch",
                   "--disk", f"{tools_disk},readonly,serial={TOOLS_SERIAL}", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
    assert "FAILED" not in result.stdout

    fio = re.search(r"^FIO t (\d+) (\d+)\s*$", result.stdout, re.M)
    assert fio, result.stdout[-3000:]
    assert fio.group(1) == "0"            # the job's error number
    assert int(fio.group(2)) > 0          # read IOPS

    iperf = re.search(r"sec\s+[\d.]+ \wBytes\s+([\d.]+) Kbits/sec\s+receiver", result.stdout)
    assert iperf, result.stdout[-3000:]
    assert float(iperf.group(1)) > 0
