"""`python -m pyvmm.seccomp.report [SINCE_LINE]`: the kernel log's seccomp records (what a VM
run in --seccomp log mode did outside its allow-list), as thread name -> system calls.

Run a VM with --seccomp log, then this: each call it names belongs in allowlist.py (with a
reason) or is a bug. The kernel names the thread (vmm-io, vmm-vcpu0, vmm-vcpus-tcg...).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict

from .libseccomp import syscall_name

_RECORD = re.compile(r'type=1326 .*?pid=(\d+) comm="([^"]*)".*? syscall=(\d+) .*?code=(0x[0-9a-f]+)')


def records(text: str) -> dict[str, set[str]]:
    """comm -> names of the calls the kernel logged for it (errno answers left out)."""
    calls: dict[str, set[str]] = defaultdict(set)
    for match in _RECORD.finditer(text):
        _pid, comm, number, code = match.groups()
        if int(code, 16) & 0xFFFF0000 == 0x00050000:
            continue  # answered with an errno on purpose (clone3 -> ENOSYS)
        calls[comm].add(syscall_name(int(number)))
    return calls


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    since = int(argv[0]) if argv else 0
    lines = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()[since:]
    for comm, names in sorted(records("\n".join(lines)).items()):
        print(f"{comm}: {' '.join(sorted(names))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
