"""What a device sees of interrupt delivery: a line it can drive or pulse."""

from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    def set_level(self, high: bool) -> None:
        """Drive the line (level-triggered semantics: the controller sees rising edges)."""

    def trigger(self) -> None:
        """Signal one edge-triggered interrupt."""


class NullIrqLine:
    """A line connected to nothing (devices used without an interrupt controller)."""

    def set_level(self, high: bool) -> None:
        pass

    def trigger(self) -> None:
        pass
