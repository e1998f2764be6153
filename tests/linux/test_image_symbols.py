"""The default image's System.map, read from the Debian kernel's own kallsyms tables (its
package ships a one-line stub), checked against what the kernel's ELF headers say."""

from __future__ import annotations

from pyvmm.loader.linux import extract_vmlinux, find_pvh_entry
from pyvmm.loader.linux.symbols import LazySymbolTable

START_KERNEL_MAP = 0xFFFFFFFF80000000  # x86-64 kernel text: virtual = physical + this


def test_system_map_names_the_pvh_entry_and_kernel_functions(image):
    assert image.system_map is not None and image.system_map.is_file()
    symbols = LazySymbolTable(image.system_map).check()
    assert len(symbols.table) > 50_000
    # the PVH entry note gives a physical address; the map must put pvh_start_xen there
    entry = find_pvh_entry(extract_vmlinux(image.kernel).read_bytes())
    assert symbols.describe(entry + START_KERNEL_MAP) == "pvh_start_xen+0x0"
    names = {}
    for line in image.system_map.read_text().splitlines():
        address, kind, name = line.split()
        names[name] = (int(address, 16), kind)
    assert names["startup_64"] == (START_KERNEL_MAP + 0x1000000, "T")
    for function in ("do_one_initcall", "fpu__init_cpu_xstate", "start_kernel"):
        address, kind = names[function]
        assert kind in "Tt" and symbols.describe(address + 4) == f"{function}+0x4"
