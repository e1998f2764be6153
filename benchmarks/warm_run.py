#!/usr/bin/env python3
"""`pyvmm run -- true` from process start to exit: from the warm snapshot (the default) and
cold (--cold, a boot), on the accelerator auto picks. pyvmm only: the comparison with QEMU
(restore from a migration file vs pyvmm's snapshot) is benchmarks' snapshot script.

Each run spawns the unmodified CLI and times it until it exits, stdin from /dev/null. The
first run of each kind is not counted: it makes the warm snapshot (and bytecode) if missing.
Python must be allowed to cache bytecode (PYTHONDONTWRITEBYTECODE unset), as an installed
pyvmm has it. Take measurements on an otherwise idle machine: the load average is printed.

    .venv/bin/python benchmarks/warm_run.py [--runs 10] [--cold-runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=3)
    args = parser.parse_args()
    env_note = " (PYTHONDONTWRITEBYTECODE is set: every run compiles pyvmm)" if os.environ.get(
        "PYTHONDONTWRITEBYTECODE") else ""
    print(f"load average {os.getloadavg()[0]:.2f}{env_note}")
    base = [sys.executable, "-m", "pyvmm.cli", "run"]
    for label, flags, runs in (("warm snapshot", ["--warm"], args.runs), ("cold boot", ["--cold"], args.cold_runs)):
        argv = [*base, *flags, "--", "true"]
        timed(argv)
        times = [timed(argv) for _ in range(runs)]
        print(f"pyvmm run {' '.join(flags)} -- true   {label:14s} median {statistics.median(times):6.3f} s  "
              f"min {min(times):6.3f} s  max {max(times):6.3f} s  ({runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
