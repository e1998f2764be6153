"""native_code_drop.c's interface (for mypy; the module is C, built by scripts/compile)."""

from collections.abc import Sequence

def drop_written(ram_offset: int, invalidate: int, engine: int, regions: Sequence[tuple[int, int, int]],
                 runs: Sequence[tuple[int, int]], /) -> bool: ...
