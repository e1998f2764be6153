"""GuestAddress: a guest-physical address, kept distinct from host pointers and sizes."""

from __future__ import annotations


class GuestAddress(int):
    """An int that means "guest physical address"; arithmetic keeps the type."""

    __slots__ = ()

    def __new__(cls, value: int) -> "GuestAddress":
        if value < 0 or value >= 1 << 64:
            raise ValueError(f"guest address {value:#x} outside the 64-bit space")
        return super().__new__(cls, value)

    def __add__(self, offset: int) -> "GuestAddress":
        return GuestAddress(int(self) + offset)

    __radd__ = __add__

    def __sub__(self, other: int) -> int:
        result = int(self) - other
        # address - address is a distance; address - distance is an address
        return result if isinstance(other, GuestAddress) else GuestAddress(result)

    def align_up(self, alignment: int) -> "GuestAddress":
        return GuestAddress((int(self) + alignment - 1) & ~(alignment - 1))

    def align_down(self, alignment: int) -> "GuestAddress":
        return GuestAddress(int(self) & ~(alignment - 1))

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"

    def __str__(self) -> str:
        return f"{int(self):#x}"
