"""uffd_rescue.c's interface (for mypy; the module is C, built by scripts/compile)."""

from collections.abc import Sequence

class Rescue:
    """A thread without the GIL that loads guest RAM from the memory file once the handler ended."""

    pages: int

    def __init__(self, userfaultfd: int, memory_fd: int, pidfd: int, mappings: Sequence[tuple[int, int, int]],
                 page_size: int, /) -> None: ...
    def stop(self) -> None: ...
