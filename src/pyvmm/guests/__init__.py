"""Tiny guest kernels for pyvmm's demo, tests, host calibration and benchmarks.

The guests ship as GNU as sources (``<name>.S``, the shared ``common32.inc``
and the linker script ``guest.ld``) and are assembled and linked on first use
with the host's binutils.  Results are cached under
``$XDG_CACHE_HOME/pyvmm/guests`` (default ``~/.cache/pyvmm/guests``), keyed by
a hash of every input (sources, include files, linker script, tool versions
and flags), so editing a source rebuilds it and concurrent builders only ever
see complete files (each writes a private temp file, then ``os.replace``).

Conventions the guests rely on (the VMM must provide them):

- COM1 16550 at 0x3f8, polled (LSR 0x3fd bit 5 before transmit, bit 0 before
  receive);
- debug exit: a 32-bit write of V to port 0xf4 stops the VM with status
  ``(V << 1) | 1``;
- i8042 reset: 0xFE written to port 0x64;
- Multiboot 1 for the 32-bit guests; pyvmm's ELF64 long-mode entry for the
  64-bit ones (see the header comment of each ``.S`` file).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from ..errors import UserError
from ..user_cache import user_cache

__all__ = [
    "CALIBRATE_KERNEL_ITERS_ADDR",
    "CALIBRATE_MMIO",
    "CALIBRATE_USER_ITERS_ADDR",
    "DEBUG_EXIT_PORT",
    "EXITBENCH_MMIO_ADDR",
    "EXITBENCH_PIO_PORT",
    "GUESTS",
    "GuestBuildError",
    "GuestInfo",
    "build",
    "build_source",
    "cache_dir",
    "source_path",
]

SOURCE_DIR = pathlib.Path(__file__).resolve().parent
LINKER_SCRIPT = SOURCE_DIR / "guest.ld"

# Guest-visible protocol constants (mirrored in the .S files).
DEBUG_EXIT_PORT = 0xF4
CALIBRATE_MMIO = 0xD0001000           # u32 markers 1, 2 (kernel loop), 3, 4 (user loop)
CALIBRATE_KERNEL_ITERS_ADDR = 0x30000  # u32 LE, written by the VMM before start
CALIBRATE_USER_ITERS_ADDR = 0x30004    # u32 LE
EXITBENCH_PIO_PORT = 0x80
EXITBENCH_MMIO_ADDR = 0xD0000000


class GuestBuildError(UserError, RuntimeError):
    """A guest could not be assembled or linked."""


@dataclass(frozen=True)
class GuestInfo:
    name: str
    bits: int           # 32: Multiboot ELF32 (QEMU-bootable); 64: pyvmm ELF64 entry
    purpose: str

    @property
    def multiboot(self) -> bool:
        return self.bits == 32


GUESTS: dict[str, GuestInfo] = {
    info.name: info
    for info in (
        GuestInfo("hello", 32, "demo: greeting, cmdline and memory size; exit=N debug-exits, else i8042 reset"),
        GuestInfo("echo", 32, "COM1 input: echoes bytes; 'q' debug-exits with the byte count mod 128"),
        GuestInfo("smp", 32, "INIT/SIPI bring-up of cpus=N CPUs; debug-exits with the CPU count"),
        GuestInfo("triple", 32, "loads an empty IDT and executes int3 to triple-fault"),
        GuestInfo("hello64", 64, "smallest long-mode guest: greeting, then debug exit 0x2a"),
        GuestInfo("faults", 64, "raises #DE #UD #BP #GP #PF, INT 0x80, SYSCALL, #DF on purpose, prints each frame, then triple-faults"),
        GuestInfo("calibrate", 64, "times CPL0 vs CPL3 loops, MMIO markers at 0xD0001000, iterations at 0x30000"),
        GuestInfo("exitbench", 32, "pio=N pior=N mmio=M exits in tight loops, then debug exit 0"),
        GuestInfo("dirtier", 32, "stores every stride=S bytes over mib=N MiB at 16 MiB, pass after pass, counting passes at 16 MiB - 4 KiB"),
    )
}

# Flags that change the output: part of the cache key.
_AS_FLAGS = {32: ["--32"], 64: ["--64"]}
_LD_FLAGS = {
    32: ["-m", "elf_i386"],
    64: ["-m", "elf_x86_64"],
}
_LD_COMMON = [
    "-nostdlib", "-static", "--build-id=none",
    "-z", "max-page-size=0x1000", "-z", "noexecstack",
]


def source_path(name: str) -> pathlib.Path:
    """The ``.S`` file of a known guest."""
    if name not in GUESTS:
        raise GuestBuildError(f"unknown guest {name!r} (known: {', '.join(sorted(GUESTS))})")
    return SOURCE_DIR / f"{name}.S"


def cache_dir() -> pathlib.Path:
    """Where built guests are kept (not created here)."""
    return user_cache("guests")


def build(name: str) -> pathlib.Path:
    """Assemble and link guest `name`; return the path of its ELF (cached)."""
    return build_source(source_path(name), GUESTS[name].bits, name=name)


def build_source(source: pathlib.Path, bits: int, *, name: str | None = None,
                 linker_script: pathlib.Path | None = None) -> pathlib.Path:
    """Assemble and link any guest source (its ``.include``s are searched in
    its own directory, then in the guests directory), with guest.ld or `linker_script`."""
    if bits not in _AS_FLAGS:
        raise ValueError(f"bits must be 32 or 64, not {bits!r}")
    source = pathlib.Path(source)
    name = name or source.stem
    as_path, ld_path = _tools()
    include_dirs = list(dict.fromkeys([source.resolve().parent, SOURCE_DIR]))
    script = pathlib.Path(linker_script) if linker_script is not None else LINKER_SCRIPT

    try:
        key = _cache_key(source, include_dirs, bits, _tool_versions(as_path, ld_path), script)
    except OSError as exc:
        raise GuestBuildError(f"cannot read guest sources: {exc}") from exc
    out_dir = cache_dir()
    target = out_dir / f"{name}-{bits}-{key[:20]}.elf"
    if target.is_file():
        return target

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as tmp:
        obj = pathlib.Path(tmp) / f"{name}.o"
        elf = pathlib.Path(tmp) / f"{name}.elf"
        as_cmd = [as_path, *_AS_FLAGS[bits]]
        for inc in include_dirs:
            as_cmd += ["-I", str(inc)]
        _run([*as_cmd, "-o", str(obj), str(source)], "assembler", source)
        _run([ld_path, *_LD_FLAGS[bits], *_LD_COMMON, "-T", str(script),
              "-o", str(elf), str(obj)], "linker", source)
        os.replace(elf, target)  # atomic: readers see the old state or the whole file
    return target


def _tools() -> tuple[str, str]:
    as_path, ld_path = shutil.which("as"), shutil.which("ld")
    if not as_path or not ld_path:
        raise GuestBuildError("GNU as/ld not found: install binutils")
    return as_path, ld_path


@functools.lru_cache(maxsize=None)
def _tool_versions(as_path: str, ld_path: str) -> str:
    out = []
    for tool in (as_path, ld_path):
        try:
            proc = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise GuestBuildError(f"cannot run {tool} --version: {exc}") from exc
        lines = proc.stdout.splitlines()
        out.append(lines[0] if lines else "")
    return "\n".join(out)


def _cache_key(source: pathlib.Path, include_dirs: list[pathlib.Path], bits: int, versions: str,
               script: pathlib.Path = LINKER_SCRIPT) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    add("source", source.read_bytes())
    add("ld-script", script.read_bytes())
    # Every include file that could be picked up (a superset is harmless:
    # at worst an unrelated edit causes a rebuild).
    for inc_dir in include_dirs:
        for inc in sorted(inc_dir.glob("*.inc")):
            add(f"inc:{inc.name}", inc.read_bytes())
    add("tools", versions.encode())
    add("flags", repr((_AS_FLAGS[bits], _LD_FLAGS[bits], _LD_COMMON)).encode())
    return h.hexdigest()


def _run(cmd: list[str], what: str, source: pathlib.Path) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise GuestBuildError("GNU as/ld not found: install binutils") from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"{what} failed on {source.name}: {exc}") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{what} failed on {source.name}: {_first_error(proc.stderr)}")


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # as: "<file>:<line>: Error: ..."; ld: "ld: ...: error: ..." or plain text.
    for line in lines:
        if re.search(r":\d+: (Error|Fatal error|error|fatal error):", line):
            return line
    for line in lines:
        if re.search(r"(^|[\s:])(Error|Fatal error|error|fatal error):", line):
            return line
    # Skip headings ("Assembler messages:", ld's "in function `x':") and warnings.
    for line in lines:
        if not (line.endswith("Assembler messages:") or line.endswith("':") or "warning:" in line):
            return line
    if lines:
        return lines[0]
    return "(no diagnostic output)"
