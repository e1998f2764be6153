"""`pyvmm migrate`'s progress display and its --bandwidth values."""

from __future__ import annotations

from typing import Any, TextIO

from ..errors import UserError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_bandwidth(text: str) -> int:
    """'100M' -> 100 MiB/s in bytes/s; a plain number is bytes/s."""
    value = text.strip().upper().removesuffix("B/S").removesuffix("/S").removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[:len(value) - len(unit)]
    try:
        result = int(float(number) * _UNITS[unit])
    except ValueError:
        raise UserError(f"--bandwidth {text!r}: expected bytes/s, e.g. 4096, 512K, 100M, 1G") from None
    if result < 4096:
        raise UserError(f"--bandwidth {text!r}: at least 4096 bytes/s")
    return result


class ProgressDisplay:
    """One line per change of status or round; on a terminal the line is rewritten in place."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last: tuple | None = None
        self._shown = False

    def show(self, progress: dict[str, Any]) -> None:
        if progress["status"] in ("completed", "failed", "cancelled"):
            return
        line = (f"{progress['status']}: round {progress['round']}, {progress['bytes_sent'] / 2**20:.1f} MiB sent, "
                f"{progress['remaining_pages'] * 4096 / 2**20:.1f} MiB dirty left, "
                f"dirtied {progress['dirty_rate'] * 4096 / 2**20:.1f} MiB/s, sent {progress['rate'] / 2**20:.1f} MiB/s, "
                f"{progress['elapsed_s']:.1f} s")
        key = (progress["status"], progress["round"])
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self._shown = True
        elif key != self._last:
            self.out.write(line + "\n")
        self._last = key
        self.out.flush()

    def done(self) -> None:
        if self.tty and self._shown:
            self.out.write("\n")
            self.out.flush()
            self._shown = False
