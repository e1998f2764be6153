"""The guest's clock keeps host time on the software CPU, with 1 and 2 vCPUs.

How guest time is measured against host time without trusting either side's latency: the
host sends a request line to the guest's console and notes the host time it went (s); the
guest reads CLOCK_MONOTONIC (/proc/timer_list's "now at") and /proc/uptime and prints them;
the host notes when that reply arrived (r). The guest read its clocks somewhere in [s, r].
Between a reading at the start and one at the end, the host time that passed is therefore
within [s_end - r_start, r_end - s_start], whatever the console's delays: a guest clock
within 2 % of host time lands inside that bracket widened by 2 %. Of several readings the
ones with the shortest round trip make the bracket narrowest; the run lasts at least 6 s and
goes on reading until the bracket is narrower than 1 % of it (on a loaded host that takes
longer; it does not pass more easily), so a guest clock off by more than 3 % always fails.

`sleep 1` is timed the same way: the round trip of `sleep 1; echo` minus that of
`sleep 0; echo` (the shortest of three each) is the host time the sleep took.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from pyvmm.accel.tcg.host_tsc import host_tsc_hz

TOLERANCE = 0.02            # guest clocks vs host time
SLEEP_TOLERANCE = 0.10      # `sleep 1` vs 1 s of host time
MIN_SPAN = 6.0              # host seconds between the first and the last clock reading (>= 5)
MAX_SPAN = 120.0            # give up measuring (a failure) when no bracket got narrow enough by then
PRECISION = 0.01            # the bracket's width, as a share of the span, to stop at
UPTIME_RESOLUTION = 0.01    # /proc/uptime counts centiseconds

GUEST = r"""
stty -echo
echo CLOCK-READY
while read -r request; do
    case $request in
    P*) { read -r _; read -r _; read -r now; } < /proc/timer_list
        read -r uptime _ < /proc/uptime
        echo "CLOCK-T $request $uptime ${now#now at }";;
    S*) seconds=${request#S}; sleep "${seconds%-*}"; echo "CLOCK-S $request slept";;
    Q) break;;
    esac
done
dmesg
"""


class Probe:
    """Requests to the guest's loop above, each timed on the host: (sent, arrived, reply words)."""

    def __init__(self, run) -> None:
        self.run, self.count = run, 0
        _, self.offset = run.wait_for(b"CLOCK-READY\r\n", timeout=300)

    def ask(self, request: str, reply: str) -> tuple[float, float, list[str]]:
        self.count += 1
        request = f"{request}-{self.count}" if request.startswith("S") else f"{request}{self.count}"
        sent = self.run.send(f"{request}\n".encode())
        _, start = self.run.wait_for(f"{reply} {request} ".encode(), after=self.offset, timeout=60)
        arrived, self.offset = self.run.wait_for(b"\n", after=start, timeout=60)
        words = self.run.output[start:self.offset].decode().split()
        return sent, arrived, words

    def clocks(self) -> tuple[float, float, float, int]:
        """(sent, arrived, /proc/uptime seconds, CLOCK_MONOTONIC ns)"""
        sent, arrived, words = self.ask("P", "CLOCK-T")
        assert words[2] == "nsecs", words
        return sent, arrived, float(words[0]), int(words[1])

    def sleep(self, seconds: int) -> float:
        sent, arrived, _ = self.ask(f"S{seconds}", "CLOCK-S")
        return arrived - sent


def round_trip(reading) -> float:
    return reading[1] - reading[0]


def host_tsc_khz() -> tuple[int, int]:
    """The host TSC rate pyvmm announces, and how far the guest's figure may differ: nothing where
    KVM reports it (KVM_GET_TSC_KHZ); without KVM pyvmm measures it, and measurements differ."""
    khz = round(host_tsc_hz() / 1000)
    exact = os.access(os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm"), os.R_OK | os.W_OK)
    return khz, 0 if exact else khz // 1000


@pytest.mark.parametrize("cpus", [1, 2])
def test_guest_clocks_and_sleep_keep_host_time(pyvmm, cpus):
    run = pyvmm.start("run", "--cpus", str(cpus), "--", "sh", "-c", GUEST, stdin=subprocess.PIPE)
    probe = Probe(run)
    start = min((probe.clocks() for _ in range(5)), key=round_trip)
    sleeps = {0: [], 1: []}
    for _ in range(3):
        for seconds in (0, 1):
            sleeps[seconds].append(probe.sleep(seconds))
    time.sleep(max(0.0, MIN_SPAN - (time.monotonic() - start[1])))
    end, readings = None, 0
    while True:
        reading = probe.clocks()
        readings += 1
        if end is None or round_trip(reading) <= round_trip(end):
            end = reading
        shortest, longest = end[0] - start[1], end[1] - start[0]
        if readings >= 5 and shortest >= MIN_SPAN and longest - shortest <= PRECISION * shortest:
            break
        assert reading[1] - start[0] < MAX_SPAN, (
            f"no clock reading bracketed to {PRECISION:.0%} within {MAX_SPAN:g} s: round trips "
            f"{round_trip(start) * 1000:.0f} and {round_trip(end) * 1000:.0f} ms")

    monotonic = (end[3] - start[3]) / 1e9
    uptime = end[2] - start[2]
    slept = min(sleeps[1]) - min(sleeps[0])
    print(f"{cpus} vCPU(s): host {shortest:.3f}-{longest:.3f} s, guest CLOCK_MONOTONIC {monotonic:.3f} s, "
          f"/proc/uptime {uptime:.2f} s; sleep 1 took {slept:.3f} s of host time (round trips "
          f"{', '.join(f'{t:.3f}' for t in sleeps[1])} s minus {', '.join(f'{t:.3f}' for t in sleeps[0])} s)")
    assert (1 - TOLERANCE) * shortest <= monotonic <= (1 + TOLERANCE) * longest
    assert (1 - TOLERANCE) * shortest - UPTIME_RESOLUTION <= uptime <= (1 + TOLERANCE) * longest + UPTIME_RESOLUTION
    assert abs(slept - 1) <= SLEEP_TOLERANCE

    run.send(b"Q\n")
    result = run.finish(timeout=300)  # the kernel-warning gate reads the console and the whole dmesg
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr)

    assert "clocksource: Switched to clocksource tsc\n" in result.stdout  # the guest keeps time with the TSC
    if "accelerator tcg" in result.stderr:
        # the host's TSC, shared by every vCPU, is not checked against jiffies, which lose ticks
        # when the host is busy (the watchdog then declared the TSC unstable)
        assert re.search(r"Kernel command line: .*\btsc=nowatchdog\b", result.stdout)
    # Linux prints the TSC's rate on a line of its own only when it differs from the processor's,
    # which it may keep from its PIT calibration (within 10%, and a loaded host skews that)
    detected = (re.search(r"tsc: Detected (\d+)\.(\d{3}) MHz TSC", result.stdout)
                or re.search(r"tsc: Detected (\d+)\.(\d{3}) MHz processor", result.stdout))
    assert detected, "the guest's dmesg has no 'tsc: Detected' line"
    guest_khz = int(detected.group(1)) * 1000 + int(detected.group(2))
    host_khz, tolerance = host_tsc_khz()
    assert abs(guest_khz - host_khz) <= tolerance, (guest_khz, host_khz)
