"""`python -m pyvmm.seccomp.trace DIR`: what each kind of thread of filtered VM processes really
called, from `strace -f -ff -ttt -o DIR/t` output, to hold against allowlist.py.

    PYVMM_SECCOMP=log strace -f -ff -ttt -qq -o DIR/t pyvmm run ...   (or pytest on VM tests)
    python -m pyvmm.seccomp.trace DIR

Only processes that loaded the process-wide filter (a `seccomp(... TSYNC ...)` call) count, and
only their calls after it. Threads are grouped by the name they gave the kernel (vmm-io,
vmm-vcpuN, vmm-vcpus-tcg; `main` for the process's first thread, `other` for the rest), with
the arguments the filters look at (ioctl requests, socket families, clone flags, prctl options).
A call listed in allowlist.py that no thread of a kind made over a broad run is a candidate
to drop; log mode's audit records (report.py) are the calls that are missing.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

_CALL = re.compile(r"^(\d+\.\d+) ([a-z0-9_]+)\((.*)")
_THREAD_CLONE = re.compile(r"^\d+\.\d+ clone3?\(.*CLONE_THREAD.*\) = (\d+)$")
_NAME = re.compile(r'PR_SET_NAME, "([^"]+)"')
_ARGUMENT = {"ioctl": 1, "socket": 0, "prctl": 0, "fcntl": 1, "madvise": 2}


def _first_arguments(call: str, rest: str) -> str | None:
    index = _ARGUMENT.get(call)
    if index is None:
        return None
    parts = [part.strip() for part in re.split(r",(?![^{\[]*[}\]])", rest.split(")", 1)[0])]
    return parts[index] if index < len(parts) else None


def summarize(directory: str | Path) -> dict[str, dict[str, Counter]]:
    """thread name -> {"calls": Counter of system calls, "arguments": Counter of "call:argument"}."""
    traces = {int(path.suffix[1:]): path.read_text(errors="replace").splitlines()
              for path in Path(directory).glob("t.*") if path.suffix[1:].isdigit()}
    creator = {}
    for tid, lines in traces.items():
        for line in lines:
            match = _THREAD_CLONE.match(line)
            if match:
                creator[int(match.group(1))] = tid

    def process_of(tid: int) -> int:
        while tid in creator:
            tid = creator[tid]
        return tid

    filtered_at: dict[int, float] = {}
    for tid, lines in traces.items():
        for line in lines:
            if " seccomp(" in line and "TSYNC" in line:
                process = process_of(tid)
                filtered_at[process] = min(filtered_at.get(process, float("inf")), float(line.split()[0]))
    result: dict[str, dict[str, Counter]] = defaultdict(lambda: {"calls": Counter(), "arguments": Counter()})
    for tid, lines in traces.items():
        process = process_of(tid)
        if process not in filtered_at:
            continue
        names = [match.group(1) for line in lines if (match := _NAME.search(line))]
        name = re.sub(r"\d+$", "N", names[-1]) if names else ("main" if tid == process else "other")
        for line in lines:
            match = _CALL.match(line)
            if not match or float(match.group(1)) < filtered_at[process]:
                continue
            call = match.group(2)
            result[name]["calls"][call] += 1
            argument = _first_arguments(call, match.group(3))
            if argument:
                result[name]["arguments"][f"{call}:{argument}"] += 1
    return dict(result)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m pyvmm.seccomp.trace DIR (strace -f -ff -ttt -o DIR/t output)", file=sys.stderr)
        return 2
    for name, seen in sorted(summarize(argv[0]).items()):
        print(f"{name}: {' '.join(sorted(seen['calls']))}")
        for argument in sorted(seen["arguments"]):
            print(f"    {argument}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
