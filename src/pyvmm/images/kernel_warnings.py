"""The kernel-warning gate: console lines that mean a Linux guest went wrong, whatever it printed.

One list, shared by everything that boots a Linux guest and judges its console: the Linux
tests (tests/helpers/linux_guest.py), scripts/boot_soak and the benchmarks. A guest can run
its command to the end with the right output and still have stalled for seconds, run its
clock at the wrong rate or hit a kernel bug on the way: these lines are how it says so.

It lives with the default guest it polices and imports nothing from pyvmm, so tests,
scripts and benchmarks (which import pyvmm from src/) can use it without starting a VMM.

The default guest boots with `quiet`, which keeps KERN_WARNING lines (WARN() splats, the
clocksource watchdog) off the console; `CONSOLE_LOGLEVEL` appended to the kernel command line
lets them through, so that a gate reading the console sees them.

    >>> find_kernel_warnings("[ 42.1] watchdog: BUG: soft lockup - CPU#0 stuck for 42s! [sh:1]")
    [KernelWarning(kind='soft lockup', line='[ 42.1] watchdog: BUG: soft lockup - CPU#0 stuck for 42s! [sh:1]')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

# console_loglevel 5: messages of level 0-4 (emergency .. warning) reach the console
CONSOLE_LOGLEVEL = "loglevel=5"

# kind -> what the kernel prints (searched anywhere in a line: a kernel message can land in
# the middle of a command's output). Case matters: these are the kernel's own spellings.
PATTERNS: dict[str, re.Pattern[str]] = {name: re.compile(pattern) for name, pattern in (
    # "rcu_preempt kthread starved for 10502 jiffies!": nothing between kthread and starved
    ("rcu stall", r"rcu: INFO: .* stall|rcu_\w+ kthread starved for|timer wakeup didn't happen"),
    ("soft lockup", r"soft lockup - CPU#\d+ stuck"),
    ("hard lockup", r"hard LOCKUP"),
    ("BUG", r"\bBUG: |kernel BUG at "),
    ("WARNING", r"\bWARNING: "),
    ("Oops", r"\bOops\b"),
    ("call trace", r"Call Trace:"),
    ("general protection", r"general protection fault"),
    ("invalid opcode", r"\binvalid opcode\b"),  # BUG() and #UD in the kernel: a translator's error too
    ("segfault", r"\bsegfault at\b"),
    ("hung task", r"blocked for more than \d+ seconds"),
    ("TSC unstable", r"Marking TSC unstable"),
    ("clocksource unstable", r"clocksource .* unstable"),
    ("kernel panic", r"Kernel panic"),
)}
KINDS = tuple(PATTERNS)


@dataclass(frozen=True)
class KernelWarning:
    kind: str
    line: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.line}"


def find_kernel_warnings(console: str | bytes, expected: Iterable[str] = ()) -> list[KernelWarning]:
    """Every line of `console` that matches a pattern, with the first kind it matches. Kinds in
    `expected` (e.g. "kernel panic" for a test that crashes the guest on purpose) are allowed:
    a line only they match passes."""
    expected = set(expected)
    unknown = expected - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kernel warning kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    if isinstance(console, bytes):
        console = console.decode(errors="replace")
    found = []
    for line in console.splitlines():
        kind = next((kind for kind, pattern in PATTERNS.items()
                     if kind not in expected and pattern.search(line)), None)
        if kind is not None:
            found.append(KernelWarning(kind, line.strip()))
    return found


def describe(warnings: list[KernelWarning], limit: int = 10) -> str:
    """One line per warning (the first `limit`), for an assertion or a script's report."""
    lines = [f"the guest kernel printed {len(warnings)} warning line(s):"]
    lines += [f"  {warning}" for warning in warnings[:limit]]
    if len(warnings) > limit:
        lines.append(f"  ... and {len(warnings) - limit} more")
    return "\n".join(lines)


def oops_lines(console: str | bytes, frames: int = 4) -> list[str]:
    """The lines that say where a kernel oops happened (its BUG/panic line, RIP, the first
    `frames` of its call trace), to name a crash in one message when the rest of the console
    is gone (an error from a boot whose log is not kept)."""
    if isinstance(console, bytes):
        console = console.decode(errors="replace")
    kept: list[str] = []
    in_trace = 0
    for line in console.splitlines():
        text = line.strip()
        if in_trace:
            kept.append(text)
            in_trace -= 1
        elif re.search(r"\bBUG: |kernel BUG at |general protection fault|Kernel panic|\bRIP: ", text):
            kept.append(text)
        elif "Call Trace:" in text:
            in_trace = frames
    return kept
