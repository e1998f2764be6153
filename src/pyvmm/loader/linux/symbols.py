"""Kernel symbols from a System.map or /proc/kallsyms: a guest address -> 'name+0xoff'.

Both files have one symbol a line, ``ADDRESS TYPE NAME`` (kallsyms adds
``\\t[module]`` for module symbols; ``nm -n`` prints the same format, with blank
addresses for undefined symbols, which are skipped). Lookup is a binary search
over the sorted addresses: an address belongs to the nearest symbol at or below
it, and is named only when that symbol is code (types T, t, W, w), so an address
in data or past the kernel's end is not pinned on the last function before it.

The map must describe the running kernel: pyvmm's PVH boot loads a vmlinux at
its link address, so the distribution's System.map matches; a kernel that
relocates itself (KASLR through the bzImage decompressor) needs the kallsyms of
that boot instead.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Iterable

from ...errors import UserError

TEXT_TYPES = frozenset("TtWw")
# How far past the very last symbol an address may lie and still be named after it.
MAX_LAST_SYMBOL_SIZE = 0x10000


class SymbolError(UserError):
    """A symbol file that cannot be read or parsed; the message is one line."""


@dataclass(frozen=True)
class Symbol:
    address: int
    type: str       # nm's letter: T/t text, D/d data, W/w weak, ...
    name: str
    module: str | None = None

    @property
    def is_code(self) -> bool:
        return self.type in TEXT_TYPES


def parse_line(line: str) -> Symbol | None:
    """One line of System.map / kallsyms / nm; None for blank lines and undefined symbols.
    Raises ValueError for anything else that is not a symbol line."""
    fields = line.split()
    if not fields:
        return None
    if len(fields) == 2 and len(fields[0]) == 1:  # nm: "                 U name"
        return None
    if len(fields) not in (3, 4):
        raise ValueError("expected ADDRESS TYPE NAME")
    address_text, type_, name = fields[:3]
    if len(type_) != 1 or not (type_.isalpha() or type_ == "?"):
        raise ValueError(f"bad symbol type {type_!r}")
    if len(address_text) > 16:
        raise ValueError(f"address {address_text!r} is wider than 64 bits")
    address = int(address_text, 16)  # ValueError when not hex
    module = None
    if len(fields) == 4:
        if not (fields[3].startswith("[") and fields[3].endswith("]")):
            raise ValueError(f"expected [module], got {fields[3]!r}")
        module = fields[3][1:-1]
    return Symbol(address, type_, name, module)


def parse(lines: Iterable[str], source: str = "symbols") -> list[Symbol]:
    symbols = []
    for number, line in enumerate(lines, 1):
        try:
            symbol = parse_line(line)
        except ValueError as exc:
            raise SymbolError(f"{source}:{number}: not a System.map or kallsyms line ({exc}): {line.strip()[:60]!r}") from None
        if symbol is not None:
            symbols.append(symbol)
    return symbols


class SymbolTable:
    """Address -> symbol lookups over one kernel's symbols."""

    def __init__(self, symbols: Iterable[Symbol]) -> None:
        ordered = sorted(symbols, key=lambda s: (s.address, not s.is_code, s.type.islower(), s.name))
        # At one address keep one name: code before data, global before local, then by name.
        self._symbols: list[Symbol] = []
        for symbol in ordered:
            if not self._symbols or self._symbols[-1].address != symbol.address:
                self._symbols.append(symbol)
        self._addresses = [s.address for s in self._symbols]
        # kallsyms read without privilege shows every address as 0: nothing can be named.
        self.restricted = bool(self._symbols) and self._addresses[-1] == 0

    def __len__(self) -> int:
        return len(self._symbols)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SymbolTable":
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return cls(parse(f, str(path)))
        except OSError as exc:
            raise SymbolError(f"{path}: {exc.strerror or exc}") from None

    def lookup(self, address: int) -> tuple[Symbol, int] | None:
        """(the code symbol containing `address`, the offset into it), or None."""
        if self.restricted:
            return None
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0:
            return None
        symbol = self._symbols[i]
        if not symbol.is_code:
            return None
        offset = address - symbol.address
        if i == len(self._symbols) - 1 and offset >= MAX_LAST_SYMBOL_SIZE:
            return None
        return symbol, offset

    def describe(self, address: int) -> str | None:
        """'name+0xoff' ('name+0xoff [module]' for a module symbol), or None."""
        found = self.lookup(address)
        if found is None:
            return None
        symbol, offset = found
        text = f"{symbol.name}+{offset:#x}"
        return f"{text} [{symbol.module}]" if symbol.module else text


class LazySymbolTable:
    """A SymbolTable read from `path` on first use: a System.map has ~100k lines and is only
    needed when an error names a guest address. `check()` fails early on a missing file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self._table: SymbolTable | None = None

    def check(self) -> "LazySymbolTable":
        """Raise SymbolError now if the file is missing or does not start like a symbol file."""
        try:
            with open(self.path, encoding="ascii", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        parse_line(line)
                        break
                else:
                    raise SymbolError(f"{self.path}: no symbols in it")
        except OSError as exc:
            raise SymbolError(f"{self.path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise SymbolError(f"{self.path}:{number}: not a System.map or kallsyms line ({exc})") from None
        return self

    @property
    def table(self) -> SymbolTable:
        if self._table is None:
            self._table = SymbolTable.from_file(self.path)
        return self._table

    def lookup(self, address: int) -> tuple[Symbol, int] | None:
        return self.table.lookup(address)

    def describe(self, address: int) -> str | None:
        return self.table.describe(address)
