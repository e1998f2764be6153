#!/usr/bin/env python3
"""Run pyvmm's fuzz harnesses under atheris (libFuzzer), each for a bounded time.

    fuzz/run.py                     every harness, --budget seconds in all (default 150)
    fuzz/run.py virtqueue elf       those harnesses
    fuzz/run.py --time 300 api      one harness for 5 minutes
    fuzz/run.py --list

Each harness runs in its own process, one at a time, seeded from fuzz/corpus/NAME (read only:
what it discovers goes to a temporary directory unless --keep-corpus), with the tokens of
fuzz/dictionaries/NAME.dict where there is one. A crash leaves its input
in fuzz/crashes/NAME/ (commit it under fuzz/regressions/NAME/ once fixed: the unit tests replay
it) and makes the run exit 1. Exit 0: every harness ran its time without a finding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(name: str, libfuzzer_args: list[str]) -> None:
    """In the harness's own process: instrument pyvmm, then fuzz."""
    import logging

    import atheris

    # A hostile guest makes devices log a warning per kind of abuse: not what a fuzz run wants to read.
    logging.disable(logging.CRITICAL)
    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["pyvmm", "harnesses"]):
        from harnesses import load

        harness = load(name)
    atheris.Setup([sys.argv[0], *libfuzzer_args], harness)
    atheris.Fuzz()


def run_one(name: str, seconds: int, keep_corpus: bool, extra: list[str]) -> bool:
    seeds = HERE / "corpus" / name
    crashes = HERE / "crashes" / name
    crashes.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"pyvmm-fuzz-{name}-") as scratch:
        corpus = seeds if keep_corpus else Path(scratch)
        dirs = [str(corpus)] + ([str(seeds)] if seeds.is_dir() and not keep_corpus else [])
        dictionary = HERE / "dictionaries" / f"{name}.dict"     # tokens the input format is made of (make_seeds.py)
        extra = ([f"-dict={dictionary}"] if dictionary.exists() else []) + extra
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--",
                   f"-max_total_time={seconds}", f"-artifact_prefix={crashes}/", "-timeout=60",
                   "-rss_limit_mb=2048", "-print_final_stats=1", *extra, *dirs]
        started = time.monotonic()
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        elapsed = time.monotonic() - started
    stats = [line for line in result.stdout.splitlines() if line.startswith(("stat::number_of_executed_units",
                                                                              "stat::new_units_added"))]
    runs = next((line.split(":")[-1].strip() for line in stats if "executed_units" in line), "?")
    found = [p.name for p in crashes.iterdir()]
    if not found:
        crashes.rmdir()
    ok = result.returncode == 0 and not found
    print(f"fuzz {name}: {'ok' if ok else 'FAILED'} ({elapsed:.0f} s, {runs} inputs)", flush=True)
    if not ok:
        tail = "\n".join(result.stdout.splitlines()[-40:])
        print(f"--- {name} (exit {result.returncode}; inputs kept in {crashes}):\n{tail}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--child"]:
        child(args_in[1], args_in[3:])
        return 0
    sys.path.insert(0, str(HERE))
    from harnesses import HARNESSES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="harnesses to run (default: all)")
    parser.add_argument("--budget", type=int, default=150, help="seconds for all of them (default 150)")
    parser.add_argument("--time", type=int, help="seconds for each (overrides --budget)")
    parser.add_argument("--keep-corpus", action="store_true", help="add new inputs to fuzz/corpus/NAME")
    parser.add_argument("--list", action="store_true", help="list the harnesses")
    args, extra = parser.parse_known_args(args_in)
    if args.list:
        print("\n".join(HARNESSES))
        return 0
    unknown = [n for n in args.names if n not in HARNESSES]
    if unknown:
        print(f"fuzz/run.py: no harness {unknown[0]!r} (see --list)", file=sys.stderr)
        return 2
    names = args.names or list(HARNESSES)
    seconds = args.time or max(1, args.budget // len(names))
    failed = [name for name in names if not run_one(name, seconds, args.keep_corpus, extra)]
    if failed:
        print(f"fuzz: findings in {', '.join(failed)} (of {len(names)} harnesses)")
        return 1
    print(f"fuzz: no finding in {len(names)} harnesses, {seconds} s each")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    # atheris follows Python bytecode: the harnesses fuzz the Python source of the modules
    # pyvmm otherwise loads compiled (pyvmm/compiled.py), the same logic.
    os.environ.setdefault("PYVMM_COMPILED", "0")
    sys.exit(main())
