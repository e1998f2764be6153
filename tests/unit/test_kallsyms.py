"""Reading a kernel's kallsyms tables out of a stripped vmlinux (loader/linux/kallsyms.py).

The images here are written by an encoder that follows scripts/kallsyms.c (token table,
token index, length-prefixed token strings, markers every 256 names, offsets against a
relative base), in the table orders kernels have used. The Debian kernel itself is read
in tests/linux/test_image_symbols.py.
"""

from __future__ import annotations

import random
import struct

import pytest

from pyvmm.loader.linux.kallsyms import KallsymsNotFound, format_system_map, read_kallsyms
from pyvmm.loader.linux.symbols import Symbol, SymbolTable, parse

BASE = 0xFFFFFFFF81000000
# multi-character tokens at codes no symbol character uses
WORDS = {0x01: "kvm_", 0x02: "init", 0x03: "_t", 0x04: "Tdo_", 0x05: "xstate"}


def tokens() -> list[str]:
    table = [""] * 256
    for code in range(0x20, 0x7F):
        table[code] = chr(code)
    for code, word in WORDS.items():
        table[code] = word
    return table


def encode(name: str, table: list[str]) -> bytes:
    codes, i = [], 0
    by_length = sorted(((w, c) for c, w in enumerate(table) if len(w) > 1), key=lambda wc: -len(wc[0]))
    while i < len(name):
        for word, code in by_length:
            if name.startswith(word, i):
                codes.append(code)
                i += len(word)
                break
        else:
            codes.append(ord(name[i]))
            i += 1
    length = len(codes)
    prefix = bytes([length]) if length < 0x80 else bytes([length & 0x7F | 0x80, length >> 7])
    return prefix + bytes(codes)


def pad8(blob: bytearray) -> None:
    blob.extend(b"\0" * (-len(blob) % 8))


def image(symbols: list[Symbol], *, order: str = "classic", seqs: bool = False,
          absolute_percpu: bool = True, base: int = BASE) -> bytes:
    """A minimal ELF64 vmlinux (one PT_LOAD at `base`) with kallsyms tables in .rodata."""
    table = tokens()
    names = bytearray()
    markers = []
    for i, s in enumerate(symbols):
        if i % 256 == 0:
            markers.append(len(names))
        names += encode(s.type + s.name, table)
    offsets = []
    for s in symbols:
        if absolute_percpu:
            offsets.append(s.address if s.address < 1 << 31 else base - 1 - s.address)
        else:
            offsets.append((s.address - base) & 0xFFFFFFFF)
    token_blob = b"".join(t.encode("latin-1") + b"\0" for t in table)
    index, at = [], 0
    for t in table:
        index.append(at)
        at += len(t) + 1

    def offsets_and_base(blob):
        pad8(blob)
        blob += struct.pack(f"<{len(offsets)}{'i' if absolute_percpu else 'I'}", *offsets)
        pad8(blob)
        blob += struct.pack("<Q", base)

    def names_part(blob):
        pad8(blob)
        blob += struct.pack("<I", len(symbols))
        pad8(blob)
        blob += names
        pad8(blob)
        blob += struct.pack(f"<{len(markers)}I", *markers)
        if seqs:
            pad8(blob)
            blob += bytes(3 * len(symbols))

    def tokens_part(blob):
        pad8(blob)
        blob += token_blob
        pad8(blob)
        blob += struct.pack("<256H", *index)

    rodata = bytearray(b"\x55" * 13)      # unrelated data before
    if order == "classic":             # offsets, base, num_syms, names, markers, [seqs], tokens
        offsets_and_base(rodata)
        names_part(rodata)
        tokens_part(rodata)
    else:                              # num_syms, names, markers, tokens, offsets, base
        names_part(rodata)
        tokens_part(rodata)
        offsets_and_base(rodata)
    pad8(rodata)
    rodata += b"some other rodata\0" * 3

    body = bytearray(0x1000) + rodata
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       2, 0x3E, 1, base, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, 0x1000000, len(body), len(body), 0x1000)
    body[:len(ehdr) + len(phdr)] = ehdr + phdr
    return bytes(body)


def kernel_symbols(count: int, seed: int = 1) -> list[Symbol]:
    rng = random.Random(seed)
    out = [Symbol(0, "A", "fixed_percpu_data"), Symbol(0x1000, "A", "cpu_debug_store")]
    address = BASE
    for i in range(count):
        kind = rng.choice("TtTtWDdBr")
        name = rng.choice(["kvm_", "do_", "init_", "x", "fpu__init_cpu_xstate", "a" * rng.randrange(1, 40)])
        out.append(Symbol(address, kind, f"{name}{i}"))
        address += rng.choice([0, 0x10, 0x40, 0x123])
    return out


@pytest.mark.parametrize("order,seqs,absolute_percpu", [
    ("classic", False, True),     # Linux <= 6.1
    ("classic", True, True),      # 6.1 stable builds with kallsyms_seqs_of_names (Debian 12)
    ("moved", False, True),       # offsets and relative_base after the token index
    ("moved", False, False),      # ... and no absolute per-CPU symbols (plain relative offsets)
])
@pytest.mark.parametrize("count", [1, 255, 256, 257, 1000])
def test_round_trip(order, seqs, absolute_percpu, count):
    symbols = kernel_symbols(count)
    if not absolute_percpu:
        symbols = [s for s in symbols if s.address >= BASE]
    found = read_kallsyms(image(symbols, order=order, seqs=seqs, absolute_percpu=absolute_percpu))
    assert found == symbols


def test_long_names_use_two_length_bytes():
    symbols = [Symbol(BASE, "T", "q" * 200), Symbol(BASE + 0x40, "t", "short")]
    assert read_kallsyms(image(symbols)) == symbols


def test_system_map_text_parses_back():
    symbols = kernel_symbols(600)
    text = format_system_map(read_kallsyms(image(symbols)))
    parsed = parse(text.splitlines())
    assert sorted(parsed, key=lambda s: (s.address, s.name)) == sorted(symbols, key=lambda s: (s.address, s.name))
    assert [s.address for s in parsed] == sorted(s.address for s in parsed)
    table = SymbolTable(parsed)
    target = next(s for s in symbols if s.type == "T" and s.address > BASE)
    assert table.lookup(target.address + 1)[1] == 1


def test_an_image_without_kallsyms_is_refused():
    data = bytearray(image(kernel_symbols(10)))
    digits = data.find(b"0\x001\x002\x00")
    data[digits:digits + 2] = b"Q\x00"
    with pytest.raises(KallsymsNotFound):
        read_kallsyms(bytes(data))


def test_inconsistent_markers_are_not_believed():
    symbols = kernel_symbols(600)
    data = bytearray(image(symbols))
    first_256 = sum(len(encode(s.type + s.name, tokens())) for s in symbols[:256])
    at = data.find(struct.pack("<II", 0, first_256))      # markers[0], markers[1]
    assert at > 0
    data[at + 4:at + 8] = struct.pack("<I", first_256 + 1)
    with pytest.raises(KallsymsNotFound):
        read_kallsyms(bytes(data))


def test_no_kernel_segment():
    symbols = [Symbol(0x1000000 + 16 * i, "T", f"f{i}") for i in range(5)]
    data = image(symbols, base=0x1000000, absolute_percpu=False)
    with pytest.raises(KallsymsNotFound, match="kernel-space"):
        read_kallsyms(bytes(data))
