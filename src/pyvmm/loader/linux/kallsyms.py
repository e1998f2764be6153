"""The kernel's own symbol table (kallsyms), read out of a vmlinux that has no ELF symbols.

Distribution kernels ship stripped: Debian's System.map is a one-line stub (the real one
is in the 280 MB -dbg package). But a kernel built with CONFIG_KALLSYMS carries every
symbol for /proc/kallsyms, in tables scripts/kallsyms.c generates, 8-byte aligned in
.rodata:

    kallsyms_offsets        s32[N]   address of symbol i, relative to kallsyms_relative_base
    kallsyms_relative_base  u64
    kallsyms_num_syms       u32      N
    kallsyms_names          N entries: a length (one byte, two when >127) and that many
                            token codes; the expanded name starts with the nm type letter
    kallsyms_markers        u32[ceil(N/256)]: offset in kallsyms_names of every 256th entry
    (kallsyms_seqs_of_names u8[3 N], in later kernels and some 6.1 stable builds)
    kallsyms_token_table    256 NUL-terminated strings, one per token code
    kallsyms_token_index    u16[256]: where each token starts in the table

Later kernels move offsets and relative_base after token_index; both orders are read. The
tables are found without symbols: the token table holds the single-character tokens
"0".."9" in a row (at codes 0x30-0x39), the token index that follows must describe it
exactly, and relative_base is the kernel's lowest text address (its first PT_LOAD);
every candidate is checked against the markers before it is believed.
"""

from __future__ import annotations

import re
import struct

from ...errors import PyvmmError
from ..elf import parse_elf
from .symbols import Symbol

DIGIT_TOKENS = b"".join(bytes([c, 0]) for c in b"0123456789")
MAX_SYMBOLS = 1 << 22
KERNEL_SPACE = 0xFFFF_8000_0000_0000


class KallsymsNotFound(PyvmmError, ValueError):
    """The image has no kallsyms tables pyvmm can read."""


def _align8(value: int) -> int:
    return (value + 7) & ~7


def read_kallsyms(vmlinux: bytes) -> list[Symbol]:
    """Every symbol of a vmlinux's kallsyms tables, in table order."""
    base = min((s.vaddr for s in parse_elf(vmlinux).segments if s.vaddr >= KERNEL_SPACE), default=None)
    if base is None:
        raise KallsymsNotFound("no kernel-space segment in the ELF headers")
    for table_start, index_end, tokens in _token_tables(vmlinux):
        for names, count, offsets in _layouts(vmlinux, base, table_start, index_end):
            symbols = _decode(vmlinux, names, count, offsets, base, tokens, table_start)
            if symbols is not None:
                return symbols
    raise KallsymsNotFound("no kallsyms tables found (a kernel built without CONFIG_KALLSYMS?)")


def _token_tables(data: bytes):
    """(token_table offset, token_index end offset, the 256 tokens) for each consistent pair."""
    for match in re.finditer(re.escape(DIGIT_TOKENS), data):
        digits = match.start()
        position, ends = digits, []
        try:
            for _ in range(0x30, 256):  # the tokens from "0" to the end of the table
                position = data.index(b"\0", position) + 1
                ends.append(position)
        except ValueError:
            continue
        index_at = _align8(position)
        if index_at + 512 > len(data):
            continue
        index = struct.unpack_from("<256H", data, index_at)
        table = digits - index[0x30]
        if table < 0 or table % 8 or index[0] != 0:
            continue
        starts = [table + offset for offset in index]
        if any(data[start - 1] != 0 for start in starts[1:]) or starts[-1] >= position:
            continue
        if any(data.index(b"\0", s) + 1 != e for s, e in zip(starts[0x30:], ends)):
            continue
        tokens = [data[s:data.index(b"\0", s)].decode("latin-1") for s in starts]
        yield table, index_at + 512, tokens


def _layouts(data: bytes, base: int, table: int, index_end: int):
    """(names offset, symbol count, offsets-array offset) candidates for both table orders."""
    pattern = re.escape(struct.pack("<Q", base))
    for match in re.finditer(pattern, data):
        at = match.start()
        if at % 8:
            continue
        if at < table:  # offsets, relative_base, num_syms, names, ... token_table
            count = struct.unpack_from("<I", data, at + 8)[0]
            if 0 < count < MAX_SYMBOLS and at - _align8(4 * count) >= 0:
                yield at + 16, count, at - _align8(4 * count)
        else:  # ... token_index, offsets, relative_base: num_syms and names come before the tokens
            offsets = _align8(index_end)
            for count in ((at - offsets) // 4, (at - offsets) // 4 - 1):
                if not 0 < count < MAX_SYMBOLS or _align8(offsets + 4 * count) != at:
                    continue
                # markers end right before the token table; names start after num_syms, a u32
                # padded to 8 bytes: look for it going back from the markers
                markers = table - _align8(4 * ((count + 255) // 256))
                needle = struct.pack("<II", count, 0)
                start = data.rfind(needle, 0, markers)
                while start >= 0 and start % 8:
                    start = data.rfind(needle, 0, start)
                if start >= 0:
                    yield start + 8, count, offsets


def _decode(data: bytes, names: int, count: int, offsets_at: int, base: int, tokens: list[str],
            table: int) -> list[Symbol] | None:
    """The symbols, or None when the candidate tables do not hold together."""
    position, starts = names, []
    end = len(data)
    try:
        for i in range(count):
            starts.append(position)
            length = data[position]
            position += 1
            if length & 0x80:
                length = (length & 0x7F) | data[position] << 7
                position += 1
            # cheap early rejection of a wrong candidate: names start with a type letter
            if i < 64 and (length == 0 or not tokens[data[position]][:1].isalpha()):
                return None
            position += length
            if position > end:
                return None
    except IndexError:
        return None
    markers_at = _align8(position)
    if markers_at + 4 * ((count + 255) // 256) > end:
        return None
    markers = struct.unpack_from(f"<{(count + 255) // 256}I", data, markers_at)
    if any(markers[i] != starts[256 * i] - names for i in range(len(markers))):
        return None
    if markers_at + 4 * len(markers) > table:
        return None
    offsets = struct.unpack_from(f"<{count}i", data, offsets_at)
    # Kernels with CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP up to 6.10) store text
    # addresses as negative offsets below the base and per-CPU symbols as absolute values;
    # without it every offset is an unsigned distance above the base, under 2 GiB.
    absolute_percpu = any(o < 0 for o in offsets)
    symbols = []
    for start, offset in zip(starts, offsets):
        length, at = data[start], start + 1
        if length & 0x80:
            length, at = (length & 0x7F) | data[start + 1] << 7, start + 2
        text = "".join(tokens[code] for code in data[at:at + length])
        if len(text) < 2 or not (text[0].isalpha() or text[0] == "?"):
            return None
        if absolute_percpu:
            address = offset if offset >= 0 else base - 1 - offset
        else:
            address = base + (offset & 0xFFFFFFFF)
        symbols.append(Symbol(address & (1 << 64) - 1, text[0], text[1:]))
    return symbols


def format_system_map(symbols: list[Symbol]) -> str:
    """The symbols as a System.map: 'ADDRESS TYPE NAME' lines sorted by address."""
    ordered = sorted(symbols, key=lambda s: (s.address, s.name))
    return "".join(f"{s.address:016x} {s.type} {s.name}\n" for s in ordered)
