"""Drop the code a vCPU translated from guest RAM that a device has since written.

Device DMA writes guest RAM through pyvmm's own mapping, behind the translator's
back, so code Unicorn translated from those bytes would keep running. Unicorn's
`ctl_remove_cache(begin, end)` cannot be used for this: it takes *virtual*
addresses and translates them through the guest's current page tables. For a
physical page it therefore drops whatever is mapped at that virtual address
(usually nothing), and the silent page fault of that walk overwrites the guest's
CR2: a process whose page fault was being delivered then sees a wrong fault
address and is killed with SIGSEGV (seen under virtio network traffic).

So pyvmm drops code by physical address, as QEMU does for its own DMA:
`qemu_ram_addr_from_host()` turns a host pointer into guest RAM into the engine's
RAM offset, and `tb_invalidate_phys_range()` drops what was translated from that
range. libunicorn exports both; they are checked on a scratch instance the first
time. Where they are missing or fail the check, the whole translation cache is
flushed instead: correct, only slower.

What devices wrote comes as runs (address, length): a 1 MiB disk read is about 256 of
them, scattered pages. `drop_written` hands them to native_code_drop.c, which makes
the two calls per run from C, where the compiled group is built; else through ctypes.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

from ...compiled import c_module

log = logging.getLogger(__name__)

RAM_ADDR_INVALID = 0xFFFF_FFFF_FFFF_FFFF
_NEVER = 0xFFFF_FFFF_FFFF_FFFF


class _PhysicalInvalidation:
    """The two engine functions, typed, and their addresses (for native_code_drop.c)."""

    def __init__(self, lib) -> None:
        self.ram_offset = lib.qemu_ram_addr_from_host_x86_64
        self.ram_offset.restype, self.ram_offset.argtypes = ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_void_p]
        self.invalidate = lib.tb_invalidate_phys_range_x86_64
        self.invalidate.restype, self.invalidate.argtypes = None, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]
        self.addresses = (ctypes.cast(self.ram_offset, ctypes.c_void_p).value,
                          ctypes.cast(self.invalidate, ctypes.c_void_p).value)


def _engine_address(uc) -> int:
    address = ctypes.cast(uc._uch, ctypes.c_void_p).value
    assert address is not None  # a live engine's handle is never NULL
    return address


class TranslatedCode:
    """One vCPU's translation cache, addressed by guest-physical RAM."""

    def __init__(self, uc, regions) -> None:
        self._uc = uc
        self._engine = _engine_address(uc)
        # (guest base, guest end, host address) of every RAM region mapped into this vCPU
        self._regions = [(r.guest_base, r.guest_base + r.size, r.host_address) for r in regions]
        self._functions = physical_invalidation()
        self.native = c_module("pyvmm.accel.tcg.native_code_drop")  # None: drop_written through ctypes

    @property
    def precise(self) -> bool:
        """Whether drop() drops just the range (else it flushes the whole cache)."""
        return self._functions is not None

    def drop(self, start: int, end: int) -> None:
        """Forget code translated from guest-physical [start, end). Only between slices."""
        functions = self._functions
        if functions is None:
            self._uc.ctl_flush_tb()
            return
        for base, region_end, host in self._regions:
            low, high = max(start, base), min(end, region_end)
            if low >= high:
                continue
            ram = functions.ram_offset(self._engine, host + (low - base))
            if ram == RAM_ADDR_INVALID:  # not a RAM block of this engine: be safe
                self._uc.ctl_flush_tb()
                return
            functions.invalidate(self._engine, ram, ram + (high - low))

    def drop_written(self, runs: list[tuple[int, int]]) -> None:
        """Forget code translated from the guest-physical runs (address, length) devices wrote.
        Only where no guest code runs on: between slices, or in a hook of the vCPU's thread."""
        functions, native = self._functions, self.native
        if functions is None:
            self._uc.ctl_flush_tb()
        elif native is not None:
            if not native.drop_written(*functions.addresses, self._engine, self._regions, runs):
                self._uc.ctl_flush_tb()  # (as drop() does for RAM that is not the engine's)
        else:
            for address, length in runs:
                self.drop(address, address + length)


_checked = False
_functions: _PhysicalInvalidation | None = None


def physical_invalidation() -> _PhysicalInvalidation | None:
    """The engine's physical invalidation, once checked; None means 'flush everything'."""
    global _checked, _functions
    if not _checked:
        _checked = True
        try:
            from unicorn.unicorn_py3.unicorn import uclib  # the binding's own ctypes handle

            functions = _PhysicalInvalidation(uclib)
            problem = _check(functions)
        except (AttributeError, ImportError) as exc:
            functions, problem = None, f"not exported ({exc})"
        if problem is None:
            _functions = functions
        else:
            log.warning("software CPU: dropping translated code by physical address is unavailable in this "
                        "unicorn build (%s); the whole translation cache is flushed after device writes instead",
                        problem)
    return _functions


# mov $1, %eax ; hlt
_CHECK_CODE = bytes.fromhex("b801000000" "f4")
_CHECK_PAGE = 0x5000


def _check(functions: _PhysicalInvalidation) -> str | None:
    """Translate code on a scratch engine, change it through the host mapping, drop it by
    physical address: the new code must run. Returns what went wrong, or None."""
    import unicorn as U
    import unicorn.x86_const as X

    size = 0x10000
    ram = mmap.mmap(-1, size)
    holder = ctypes.c_char.from_buffer(ram)
    uc = None
    try:
        host = ctypes.addressof(holder)
        uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
        uc.ctl_exits_enabled(True)  # as TcgVcpu runs it
        uc.ctl_set_exits([])
        uc.mem_map_ptr(0, size, U.UC_PROT_ALL, host)
        ram[_CHECK_PAGE:_CHECK_PAGE + len(_CHECK_CODE)] = _CHECK_CODE
        uc.emu_start(_CHECK_PAGE, _NEVER)
        ram[_CHECK_PAGE + 1] = 2  # mov $2, %eax: unseen until the old translation is dropped
        uc.emu_start(_CHECK_PAGE, _NEVER)
        if uc.reg_read(X.UC_X86_REG_EAX) != 1:
            return "the check could not observe a stale translation"
        engine = _engine_address(uc)
        offset = functions.ram_offset(engine, host + _CHECK_PAGE)
        if offset != _CHECK_PAGE:  # one RAM block at 0: RAM offsets are guest addresses
            return f"RAM offset {offset:#x} for guest address {_CHECK_PAGE:#x}"
        functions.invalidate(engine, offset, offset + 0x1000)
        uc.emu_start(_CHECK_PAGE, _NEVER)
        if uc.reg_read(X.UC_X86_REG_EAX) != 2:
            return "the translated code survived its invalidation"
        return None
    finally:
        del uc, holder  # the engine first: it points into `ram`
        ram.close()
