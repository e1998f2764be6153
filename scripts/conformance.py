#!/usr/bin/env python3
"""x86 conformance report: every test kernel of tests/conformance on pyvmm (software CPU and
KVM) and on QEMU (TCG), in the same run, as one table per area.

    scripts/conformance.py [--backends tcg,kvm,qemu] [--kernel NAME ...] [--summary]

A cell is ok, FAIL, skip (the CPU does not announce the feature), missing (the kernel died or
hung before the check), n/a (the backend cannot run here: no KVM, no QEMU, or a host that
cannot run the kernel); "!" marks a cell that differs from QEMU's. The expectations come from
the SDM (the kernels compute them); tests/helpers/conformance.py lists each known
deviation and why. Exit status 0 when every pyvmm cell is ok, skip, or a listed deviation.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections import defaultdict

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from helpers import conformance as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(C.BACKENDS),
                        help="comma-separated, from: " + ", ".join(C.BACKENDS))
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    parser.add_argument("--summary", action="store_true",
                        help="one line per area (ok / checks per backend) and the cells that are not ok")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in C.BACKENDS]
    if unknown or not backends:
        print(f"conformance.py: unknown backend(s) {', '.join(unknown) or '(none)'}; known: "
              f"{', '.join(C.BACKENDS)}", file=sys.stderr)
        return 2
    kernels = C.kernels()
    if args.kernel:
        missing = [k for k in args.kernel if k not in kernels]
        if missing:
            print(f"conformance.py: no kernel {', '.join(missing)}; known: {', '.join(kernels)}", file=sys.stderr)
            return 2
        kernels = args.kernel

    rows: dict[str, list[tuple[str, dict[str, str]]]] = defaultdict(list)
    unexpected = 0
    for kernel in kernels:
        runs = {}
        for backend in backends:
            reason = C.skip_reason(backend, kernel)
            runs[backend] = None if reason else C.run(kernel, backend, timeout=30)
        for check in C.declared_checks(kernel):
            cells = {}
            for backend, run in runs.items():
                outcome = "n/a" if run is None else run.outcome(check)
                cells[backend] = outcome
                listed = (backend, check) in C.DEVIATIONS
                if backend != "qemu" and outcome not in ("ok", "skip", "n/a") and not listed:
                    unexpected += 1
            rows[check.split(".", 1)[0]].append((check, cells))

    width = max(len(check) for area in rows.values() for check, _ in area)
    if args.summary:
        _print_summary(rows, backends, width)
    for area in sorted(rows) if not args.summary else ():
        print(f"\n{area}")
        print(f"  {'check':<{width}}  " + "  ".join(f"{b:<8}" for b in backends))
        for check, cells in rows[area]:
            reference = cells.get("qemu")
            shown = []
            for backend in backends:
                cell = cells[backend]
                differs = backend != "qemu" and reference not in (None, "n/a") and cell != "n/a" and cell != reference
                shown.append(f"{cell + ('!' if differs else ''):<8}")
            print(f"  {check:<{width}}  " + "  ".join(shown))
    total = sum(len(area) for area in rows.values())
    summary = {b: sum(1 for area in rows.values() for _, cells in area if cells[b] == "ok") for b in backends}
    print("\nok per backend: " + ", ".join(f"{b} {n}/{total}" for b, n in summary.items()))
    if unexpected:
        print(f"{unexpected} pyvmm cell(s) fail without a listed deviation", file=sys.stderr)
    return 1 if unexpected else 0


def _print_summary(rows, backends: list[str], width: int) -> None:
    print(f"  {'area':<12}" + "".join(f"{b:>10}" for b in backends))
    for area in sorted(rows):
        counts = [f"{sum(1 for _, cells in rows[area] if cells[b] == 'ok')}/{len(rows[area])}" for b in backends]
        print(f"  {area:<12}" + "".join(f"{c:>10}" for c in counts))
    print("\n  not ok (n/a: the backend cannot run that kernel here):")
    for area in sorted(rows):
        for check, cells in rows[area]:
            if any(cells[b] not in ("ok", "n/a") for b in backends):
                print(f"  {check:<{width}}  " + "  ".join(f"{cells[b]:<8}" for b in backends))


if __name__ == "__main__":
    sys.exit(main())
