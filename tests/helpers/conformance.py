"""Differential conformance runs: one Multiboot test kernel on pyvmm (each accelerator) and on QEMU.

The kernels live in tests/conformance/kernels (GNU as, built at test time with the guests'
common32.inc and the harness's conform.inc). Each prints `CHECK <name> ok|FAIL ...|skip ...`
lines on COM1 and ends with `DONE` and a debug exit. `run(kernel, backend)` boots it on one
backend and returns the parsed results; a kernel that dies early has no line for the checks it
did not reach, and `DONE` is missing.

Backends: "tcg" (pyvmm's software CPU), "kvm" (pyvmm on /dev/kvm), "qemu" (qemu-system-x86_64
-accel tcg, the oracle), each a `pyvmm run` / QEMU process of its own.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from pyvmm.guests import build_source

KERNEL_DIR = pathlib.Path(__file__).resolve().parent.parent / "conformance" / "kernels"
BACKENDS = ("tcg", "kvm", "qemu")
QEMU = "qemu-system-x86_64"
# QEMU's CPU model for the oracle: "max" is every feature QEMU's TCG implements.
QEMU_CPU = "max"
_CHECK = re.compile(r"^CHECK (\S+) (ok|FAIL|skip)\b ?(.*)$")


@dataclass
class Run:
    backend: str
    kernel: str
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (ok|FAIL|skip, detail)
    done: bool = False
    status: int | None = None
    output: str = ""
    problem: str = ""  # why the backend could not run the kernel at all

    def outcome(self, check: str) -> str:
        """ok, FAIL, skip, or "missing" (the kernel died before the check)."""
        if self.problem:
            return "n/a"
        return self.results.get(check, ("missing", ""))[0]


def kernels() -> list[str]:
    return sorted(p.stem for p in KERNEL_DIR.glob("*.S"))


def kernel_path(name: str) -> pathlib.Path:
    """Built with guest.ld (linked at 1 MiB), or with kernels/<name>.ld where there is one."""
    script = KERNEL_DIR / f"{name}.ld"
    return build_source(KERNEL_DIR / f"{name}.S", 32, name=f"conform-{name}",
                        linker_script=script if script.exists() else None)


def parse(output: str) -> tuple[dict[str, tuple[str, str]], bool]:
    results: dict[str, tuple[str, str]] = {}
    done = False
    for raw in output.splitlines():
        line = raw.strip("\r\x00 ")
        match = _CHECK.match(line)
        if match:
            results[match.group(1)] = (match.group(2), match.group(3))
        elif line == "DONE":
            done = True
    return results, done


def kvm_problem() -> str | None:
    from pyvmm.kvm import Kvm, KvmUnavailable

    try:
        Kvm().close()
    except KvmUnavailable as exc:
        return str(exc)
    return None


def qemu_problem() -> str | None:
    return None if shutil.which(QEMU) else f"{QEMU} not installed (Debian: qemu-system-x86)"


def _command(backend: str, kernel: pathlib.Path) -> list[str]:
    if backend == "qemu":
        return [QEMU, "-accel", "tcg", "-cpu", QEMU_CPU, "-m", "64", "-kernel", str(kernel),
                "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    return [sys.executable, "-m", "pyvmm.cli", "run", "--accel", backend, "--memory", "64M",
            "--kernel", str(kernel)]


def run(name: str, backend: str, timeout: float = 60) -> Run:
    result = Run(backend, name)
    problem = qemu_problem() if backend == "qemu" else kvm_problem() if backend == "kvm" else None
    if problem:
        result.problem = problem
        return result
    try:
        completed = subprocess.run(_command(backend, kernel_path(name)), stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace")
        result.results, result.done = parse(output)
        result.output = output + f"\n[timed out after {timeout} s]"
        return result
    result.output = completed.stdout.decode(errors="replace") + completed.stderr.decode(errors="replace")
    result.status = completed.returncode
    result.results, result.done = parse(completed.stdout.decode(errors="replace"))
    return result
