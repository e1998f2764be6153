"""An interrupt line for device tests: it remembers every level it was driven to."""

from __future__ import annotations


class RecordingIrq:
    def __init__(self, *, level_only: str | None = None) -> None:
        """`level_only`: the device must never pulse this line; the text says why if it does."""
        self.levels: list[bool] = []
        self.triggers = 0
        self._level_only = level_only

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    def trigger(self) -> None:
        if self._level_only is not None:
            raise AssertionError(self._level_only)
        self.triggers += 1

    @property
    def high(self) -> bool:
        return bool(self.levels) and self.levels[-1]
