"""Kernel symbol files (loader/linux/symbols.py): System.map, /proc/kallsyms and nm output,
and address -> 'name+0xoff' lookups."""

from __future__ import annotations

import random
import subprocess

import pytest

from pyvmm.guests import build
from pyvmm.loader.linux.symbols import (
    MAX_LAST_SYMBOL_SIZE, LazySymbolTable, Symbol, SymbolError, SymbolTable, parse, parse_line,
)

SYSTEM_MAP = """\
0000000000000000 D __per_cpu_start
0000000000001000 D cpu_debug_store
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 t startup_64
ffffffff81000070 T secondary_startup_64
ffffffff81000100 W weak_function
ffffffff81000200 t local_helper
ffffffff81e00000 T _etext
ffffffff81e00000 D _sdata
ffffffff81e00100 d some_table
ffffffff82000000 B __bss_start
ffffffff82100000 B _end
"""

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81001000 T do_one_initcall
ffffffffc0200000 t virtnet_probe\t[virtio_net]
ffffffffc0200400 t virtnet_remove\t[virtio_net]
"""


def table(text: str) -> SymbolTable:
    return SymbolTable(parse(text.splitlines(), "test"))


def test_parse_lines():
    assert parse_line("ffffffff81000070 T secondary_startup_64\n") == Symbol(0xFFFFFFFF81000070, "T", "secondary_startup_64")
    assert parse_line("ffffffffc0200000 t virtnet_probe\t[virtio_net]") == Symbol(
        0xFFFFFFFFC0200000, "t", "virtnet_probe", "virtio_net")
    assert parse_line("   \n") is None
    assert parse_line("                 U undefined_elsewhere") is None   # nm's undefined symbols


@pytest.mark.parametrize("line", [
    "ffffffff81000070 secondary_startup_64",         # no type
    "zzzz T name",                                    # not hex
    "ffffffff81000070 TT name",                       # a two-letter type
    "ffffffff81000070 T name extra",                  # a fourth field that is no [module]
    "1ffffffff81000070 T name",                       # wider than 64 bits
    "ffffffff81000070 T name [mod] more",
])
def test_malformed_lines_are_refused(line):
    with pytest.raises(ValueError):
        parse_line(line)


def test_parse_error_names_the_line():
    with pytest.raises(SymbolError, match=r"^map:3: not a System.map or kallsyms line"):
        parse(["ffffffff81000000 T a", "", "garbage"], "map")


def test_lookup_in_a_system_map():
    symbols = table(SYSTEM_MAP)
    assert symbols.describe(0xFFFFFFFF81000000) == "_stext+0x0"           # a global name before a local one
    assert symbols.describe(0xFFFFFFFF81000047) == "_stext+0x47"
    assert symbols.describe(0xFFFFFFFF81000070) == "secondary_startup_64+0x0"
    assert symbols.describe(0xFFFFFFFF810000FF) == "secondary_startup_64+0x8f"
    assert symbols.describe(0xFFFFFFFF81000123) == "weak_function+0x23"   # W is code
    assert symbols.describe(0xFFFFFFFF81123456) == "local_helper+0x123256"
    assert symbols.lookup(0xFFFFFFFF81000200)[0].type == "t"


def test_addresses_outside_code_are_not_named():
    symbols = table(SYSTEM_MAP)
    assert symbols.describe(0xFFFFFFFF80FFFFFF) is None       # below the kernel: per-CPU data
    assert symbols.describe(0x1234) is None
    assert symbols.describe(0) is None
    assert symbols.describe(0xFFFFFFFF81E00000) == "_etext+0x0"   # _etext is T, and before _sdata here
    assert symbols.describe(0xFFFFFFFF81E00180) is None       # data
    assert symbols.describe(0xFFFFFFFF82100000) is None       # _end is B
    assert symbols.describe(0xFFFFFFFFFFFFFFFF) is None


def test_module_symbols_from_kallsyms():
    symbols = table(KALLSYMS)
    assert symbols.describe(0xFFFFFFFFC0200010) == "virtnet_probe+0x10 [virtio_net]"
    assert symbols.describe(0xFFFFFFFFC0200400 + MAX_LAST_SYMBOL_SIZE - 1).startswith("virtnet_remove+")
    assert symbols.describe(0xFFFFFFFFC0200400 + MAX_LAST_SYMBOL_SIZE) is None   # far past the last symbol


def test_kallsyms_read_without_privilege_names_nothing():
    symbols = table("0000000000000000 T _stext\n0000000000000000 T do_one_initcall\n")
    assert symbols.restricted
    assert symbols.describe(0) is None and symbols.describe(0x10) is None


def test_order_of_the_file_does_not_matter():
    lines = SYSTEM_MAP.splitlines()
    shuffled = lines[:]
    random.Random(7).shuffle(shuffled)
    ordered, mixed = table(SYSTEM_MAP), SymbolTable(parse(shuffled))
    for address in (0xFFFFFFFF81000000, 0xFFFFFFFF81000071, 0xFFFFFFFF81000250, 0xFFFFFFFF81E00050):
        assert ordered.describe(address) == mixed.describe(address)


def test_lookup_agrees_with_a_linear_scan():
    rng = random.Random(3)
    symbols = [Symbol(rng.randrange(1 << 20) & ~7, rng.choice("TtDdWwBr"), f"s{i}") for i in range(300)]
    symbols_table = SymbolTable(symbols)
    for _ in range(2000):
        address = rng.randrange(1 << 20)
        below = [s for s in symbols if s.address <= address]
        if not below:
            assert symbols_table.lookup(address) is None
            continue
        nearest = max(s.address for s in below)
        at = [s for s in below if s.address == nearest]
        best = sorted(at, key=lambda s: (not s.is_code, s.type.islower(), s.name))[0]
        is_last = nearest == max(s.address for s in symbols)
        if not best.is_code or is_last and address - nearest >= MAX_LAST_SYMBOL_SIZE:
            assert symbols_table.lookup(address) is None, hex(address)
        else:
            assert symbols_table.lookup(address) == (best, address - nearest)


def test_nm_output_of_a_guest(tmp_path):
    elf = build("hello64")
    text = subprocess.run(["nm", "-n", str(elf)], check=True, capture_output=True, text=True).stdout
    path = tmp_path / "hello64.map"
    path.write_text(text)
    start = next(int(line.split()[0], 16) for line in text.splitlines() if line.endswith(" _start"))
    symbols = LazySymbolTable(path).check()
    assert symbols.describe(start + 3) == "_start+0x3"


def test_lazy_table_reads_the_file_only_when_asked(tmp_path):
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    lazy = LazySymbolTable(path).check()
    path.write_text(SYSTEM_MAP.replace("secondary_startup_64", "renamed_later"))
    assert lazy.describe(0xFFFFFFFF81000071) == "renamed_later+0x1"   # read at first use, not by check()
    path.write_text("")
    assert lazy.describe(0xFFFFFFFF81000071) == "renamed_later+0x1"   # and only once


@pytest.mark.parametrize("content,message", [
    (None, "No such file"),
    ("", "no symbols"),
    ("\n\nthis is not a symbol map\n", r":3: not a System.map or kallsyms line"),
    ("\x7fELF\x02\x01\x01", "not a System.map"),
])
def test_check_refuses_what_is_not_a_symbol_file(tmp_path, content, message):
    path = tmp_path / "System.map"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SymbolError, match=message) as info:
        LazySymbolTable(path).check()
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(SymbolError):
        LazySymbolTable(tmp_path).check()
    with pytest.raises(SymbolError):
        SymbolTable.from_file(tmp_path)
