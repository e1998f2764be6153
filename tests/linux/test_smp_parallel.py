"""Processes running in parallel on two vCPUs of the software CPU get exact results (issue 17
item 4): its vCPUs share one translator, whose TLB is kept across a switch between vCPUs with
the same paging registers (translator.py). Four shell pipelines, each its own processes and
page tables, fork, fault pages in and exit on both vCPUs at once (TLB shootdowns between them);
each checksum must be the host's."""

from __future__ import annotations

import hashlib
import re

JOBS = 4
COUNT = 4000
SCRIPT = (f"for j in $(seq 1 {JOBS}); do (seq $j {JOBS} {COUNT} | md5sum | sed \"s/^/job$j /\") & done; wait; "
          "echo cpus=$(grep -c ^processor /proc/cpuinfo)")


def expected_sums() -> dict[str, str]:
    sums = {}
    for job in range(1, JOBS + 1):
        text = "".join(f"{n}\n" for n in range(job, COUNT + 1, JOBS))
        sums[f"job{job}"] = hashlib.md5(text.encode()).hexdigest()
    return sums


def test_parallel_processes_on_two_vcpus_compute_exact_results(pyvmm):
    result = pyvmm("run", "--accel", "tcg", "--cpus", "2", "--", "sh", "-c", SCRIPT)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr)
    found = dict(re.findall(r"^(job\d+) ([0-9a-f]{32}) ", result.stdout, re.M))
    assert found == expected_sums(), result.stdout[-3000:]
    assert re.search(r"^cpus=2\r?$", result.stdout, re.M), result.stdout[-3000:]
