"""Keep the engine's translated code within a direct call of libunicorn.

Translated code calls into libunicorn all the time: the exit check that opens every block,
lookup_tb_ptr at indirect jumps, the memory slow paths, pyvmm's patched helpers. TCG's x86-64
backend emits `call rel32` where the helper lies within 2 GiB of the call, and a 64-bit
`movabs` plus an indirect `call *%r10` where it does not. Unicorn mmaps its code buffer (1 GiB)
wherever the kernel puts it: top-down, below what was mapped since libunicorn was loaded (guest
RAM, the threads' malloc arenas, other engines' buffers). Which of the two a VM got depended on
that order, and it mattered: 4 KiB disk reads at iodepth 1 took 1.5-2.2x as long in a process
whose buffer lay 3.3 GiB below libunicorn as in one whose buffer lay 2 MiB below it, the same
build and guest (README, Benchmarks; perf put the difference in the blocks' exit check).

So the buffer's place is prepared: when this package is imported (which loads libunicorn), a
reservation of the buffer's size is mapped (PROT_NONE, no memory behind it), where the kernel
puts the next mapping: right below libunicorn. An engine about to allocate its buffer (its first
call after uc_open) gives it back first, and the buffer takes its place. Whether or not there
was one, the place a buffer would take is checked (a PROT_NONE probe, unmapped at once: the
kernel then gives the buffer that same place), and where 1 GiB does not land within reach,
smaller buffers are tried (UC_CTL_TCG_BUFFER_SIZE; Unicorn flushes a full buffer and goes on).
Only the first engine gets the reservation; later ones get what the probe finds.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 30  # Unicorn 2.1's code buffer on 64-bit hosts
SIZES = (DEFAULT_SIZE, 512 << 20, 256 << 20, 128 << 20)
REACH = (1 << 31) - (1 << 20)  # a rel32 call's reach, less a margin for the call's own length
LIBRARY = "libunicorn"

_PROT_NONE = 0
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x02, 0x20, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None)
_mmap = _libc.mmap
_mmap.restype, _mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                                  ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype, _munmap.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]

_lock = threading.Lock()
_reserved: tuple[int, int] | None = None  # (address, size) held for the first engine


def library_code(maps_text: str) -> tuple[int, int] | None:
    """The span of libunicorn's executable mappings in a /proc/<pid>/maps text, or None."""
    spans = []
    for line in maps_text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and "x" in fields[1] and LIBRARY in fields[5]:
            low, high = (int(part, 16) for part in fields[0].split("-"))
            spans.append((low, high))
    if not spans:
        return None
    return min(low for low, _ in spans), max(high for _, high in spans)


def within_reach(address: int, size: int, code: tuple[int, int]) -> bool:
    """Can every call from [address, address + size) reach every target in `code` with a rel32?"""
    low, high = code
    return high - address <= REACH and address + size - low <= REACH


def _own_library_code() -> tuple[int, int] | None:
    try:
        with open("/proc/self/maps") as maps:
            return library_code(maps.read())
    except OSError:
        return None


def _map_placeholder(size: int) -> int | None:
    address = _mmap(None, size, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    return None if address in (None, _MAP_FAILED) else address


def _where_the_next_would_go(size: int) -> int | None:
    """Where the kernel puts the next mapping of `size` bytes (asked with a mapping, undone)."""
    address = _map_placeholder(size)
    if address is not None:
        _munmap(address, size)
    return address


def reserve() -> None:
    """Hold the place below libunicorn for the first engine's buffer (called on import)."""
    global _reserved
    code = _own_library_code()
    with _lock:
        if _reserved is not None or code is None:
            return
        address = _map_placeholder(DEFAULT_SIZE)
        if address is None:
            return
        if within_reach(address, DEFAULT_SIZE, code):
            _reserved = (address, DEFAULT_SIZE)
        else:
            _munmap(address, DEFAULT_SIZE)


def place(uc) -> int | None:
    """Call with a new engine, before its first call allocates its code buffer: give it the
    reservation or a size that lands within reach of libunicorn. Returns the buffer size it
    will get within reach, or None (it keeps Unicorn's default, wherever that lands)."""
    global _reserved
    code = _own_library_code()
    with _lock:
        if _reserved is not None:
            _munmap(*_reserved)
            _reserved = None
        if code is None:
            return None
        for size in SIZES:
            address = _where_the_next_would_go(size)
            if address is not None and within_reach(address, size, code):
                if size != DEFAULT_SIZE:
                    uc.ctl_set_tcg_buffer_size(size)
                return size
    log.info("software CPU: no room for translated code within 2 GiB of libunicorn; its calls there go "
             "through a register (slower)")
    return None
