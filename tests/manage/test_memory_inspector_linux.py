"""`pyvmm mem translate` and `mem read` on the default Linux guest (software CPU), as a managed
VM: the kernel's linux_banner (its address from the image's System.map) is walked through the
guest kernel's own page tables to the guest-physical address where the same bytes are, and a
user address no process maps stops the walk (exit 2)."""

from __future__ import annotations

import re
import subprocess
import sys

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings

from test_managed_vms import PROMPT, cli, read_until


def _symbol(system_map, name: str) -> int:
    for line in open(system_map):
        address, _, symbol = line.split()
        if symbol == name:
            return int(address, 16)
    raise AssertionError(f"{name} not in {system_map}")


def test_the_guest_kernels_banner_through_its_page_tables(env, tmp_path, image):
    values, host = env
    assert image.system_map is not None
    banner = _symbol(image.system_map, "linux_banner")
    definition = tmp_path / "walked.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", "walked")
    vm = host.vm("walked")
    read_until(vm.open_console(), re.escape(PROMPT))

    def pyvmm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, text=True, env=values,
                              timeout=120)

    shown = pyvmm("mem", "translate", "walked", hex(banner))
    assert shown.returncode == 0, shown.stderr
    assert re.match(rf"GVA {banner:#x}, vCPU 0: paging (4|5)-level ", shown.stdout)
    levels = [line.split()[0] for line in shown.stdout.splitlines() if line.startswith("  ")]
    assert levels[0] in ("PML4", "PML5") and levels[-1] in ("PD", "PT")
    gpa = int(re.search(r"^GPA (0x[0-9a-f]+)", shown.stdout, re.M).group(1), 16)
    text = vm.read_memory(banner, 64)
    assert text.startswith(b"Linux version ") and vm.read_memory(gpa, 64, physical=True) == text
    dump = pyvmm("mem", "read", "walked", hex(banner), "16")
    assert dump.returncode == 0 and dump.stdout == f"{banner:016x}: 4c69 6e75 7820 7665 7273 696f 6e20 {text[14:16].hex()}  "\
        f"{text[:16].decode()}\n"

    unmapped = pyvmm("mem", "translate", "walked", "0x1000")  # the first page is never mapped
    assert unmapped.returncode == 2 and "is not present" in unmapped.stderr and "\n" not in unmapped.stderr[:-1]
    cli(env, "shutdown", "walked", "--timeout", "300")
    warnings = find_kernel_warnings(vm.console_history())
    assert not warnings, describe(warnings)
