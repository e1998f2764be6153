"""Reader: a fuzz input consumed as small integers, flags and byte strings (never raises: an
input that ran out reads as zeroes), so a harness is a plain function of its bytes."""

from __future__ import annotations


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = bytes(data), 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.at:self.at + n]
        self.at += len(chunk)
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def choice(self, options):
        return options[self.u8() % len(options)]

    def below(self, limit: int) -> int:
        return self.u32() % limit if limit > 0 else 0

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.at)

    @property
    def left(self) -> int:
        return len(self.data) - self.at
