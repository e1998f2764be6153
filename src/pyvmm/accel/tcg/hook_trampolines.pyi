# hook_trampolines.c: Unicorn port-I/O and MMIO hook functions in C (built by scripts/compile).
from typing import Any, Callable, Final

class Target:
    """What one hook calls: handler(running.current, port or base + offset, size[, value])."""

    address: int  # the hook's user data; valid while this object lives

    def __init__(self, handler: Callable[..., Any], running: Any, failed: Callable[[BaseException], None],
                 base: int = 0) -> None: ...

ON_IN: Final[int]
ON_OUT: Final[int]
ON_MMIO_READ: Final[int]
ON_MMIO_WRITE: Final[int]

FILTER_SLOTS: Final[int]

def set_filter(slot: int, handler: Callable[[int, int, int], tuple[int, int]],
               failed: Callable[[BaseException], None]) -> int:
    """Slot `slot`'s C filter, for a patched helper's stub (helper_patch.py), calls
    handler(env, arg1, arg2) -> (action, value) from now on; returns its address."""
