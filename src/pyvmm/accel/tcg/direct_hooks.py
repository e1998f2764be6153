"""Port I/O and MMIO callbacks registered with libunicorn without the binding's two wrappers.

Unicorn's Python binding calls each hook through an exception guard and an adapter that
reorders its arguments: two Python frames on every guest port or MMIO access, which the
console (3.7 port accesses per byte) and every virtio kick and LAPIC access pay. These
callbacks use the binding's own ctypes function types and the same library calls
(uc_hook_add, uc_mmio_map), and keep the guard's contract: an exception is recorded on the
Uc, whose emu_start raises it when the slice has stopped, and the slice stops.

`install()` returns None where this binding lacks what that needs (another Unicorn version);
the caller then registers through the binding. With the compiled group built
(pyvmm/compiled.py), the hooks are C functions (hook_trampolines.c) that call guest_io.py's
compiled handlers directly, without ctypes' callback machinery; without it, ctypes callbacks
of the binding's function types do the same, and reach guest_io.py without a Python frame
when this module is compiled.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Protocol

from ...compiled import c_module
from .guest_io import mmio_read, mmio_write, port_in, port_out

log = logging.getLogger(__name__)


class Running(Protocol):
    """Whose `current` is the vCPU the engine runs (the translator), whose port I/O and MMIO
    guest_io.py serves."""

    current: Any


class DirectHooks:
    def __init__(self, uc, uclib, types: dict) -> None:
        self._uc, self._uclib, self._types = uc, uclib, types
        self._keep: list = []  # the function pointers and targets live as long as the engine that calls them
        self.trampolines = c_module("pyvmm.accel.tcg.hook_trampolines")  # None: ctypes callbacks

    def _failed(self, exc: BaseException) -> None:
        uc = self._uc
        if uc._hook_exception is None:  # the binding's emu_start raises it after the slice
            uc._hook_exception = exc
        uc.emu_stop()

    def port_io(self, running: Running) -> None:
        """IN and OUT to the running vCPU, through guest_io.py."""
        failed = self._failed
        trampolines = self.trampolines
        if trampolines is not None:
            for handler, function, instruction in ((port_in, trampolines.ON_IN, self._types["insn_in"]),
                                                   (port_out, trampolines.ON_OUT, self._types["insn_out"])):
                target = trampolines.Target(handler, running, failed)
                self._hook(ctypes.c_void_p(function), instruction, target.address)
                self._keep.append(target)
            return

        def on_in(_engine, port, size, _data):
            try:
                return port_in(running.current, port, size)
            except BaseException as exc:  # (as the binding's guard: nothing may unwind into C)
                failed(exc)
                return 0

        def on_out(_engine, port, size, value, _data):
            try:
                port_out(running.current, port, size, value)
            except BaseException as exc:
                failed(exc)

        self._hook(self._types["in"](on_in), self._types["insn_in"])
        self._hook(self._types["out"](on_out), self._types["insn_out"])

    def _hook(self, function, instruction: int, user_data: int = 0) -> None:
        handle = self._types["handle"]()
        status = self._uclib.uc_hook_add(self._uc._uch, ctypes.byref(handle), self._types["hook_insn"], function,
                                         ctypes.c_void_p(user_data), ctypes.c_uint64(1), ctypes.c_uint64(0),
                                         ctypes.c_int(instruction))
        if status != 0:
            raise self._types["error"](status)
        self._keep.append(function)

    def mmio(self, address: int, size: int, running: Running) -> None:
        """Guest-physical [address, address+size) is MMIO of the running vCPU's buses."""
        failed = self._failed
        trampolines = self.trampolines
        if trampolines is not None:
            reader = trampolines.Target(mmio_read, running, failed, address)
            writer = trampolines.Target(mmio_write, running, failed, address)
            status = self._uclib.uc_mmio_map(self._uc._uch, address, size, trampolines.ON_MMIO_READ, reader.address,
                                             trampolines.ON_MMIO_WRITE, writer.address)
            if status != 0:
                raise self._types["error"](status)
            self._keep += (reader, writer)
            return

        def on_read(_engine, offset, access_size, _data):
            try:
                return mmio_read(running.current, address + offset, access_size)
            except BaseException as exc:
                failed(exc)
                return 0

        def on_write(_engine, offset, access_size, value, _data):
            try:
                mmio_write(running.current, address + offset, access_size, value)
            except BaseException as exc:
                failed(exc)

        read_function, write_function = self._types["mmio_read"](on_read), self._types["mmio_write"](on_write)
        status = self._uclib.uc_mmio_map(self._uc._uch, address, size, read_function, 0, write_function, 0)
        if status != 0:
            raise self._types["error"](status)
        self._keep += (read_function, write_function)


def install(uc) -> DirectHooks | None:
    """Direct hooks on `uc`, or None where the binding is not the one this was written against."""
    try:
        import unicorn as U
        import unicorn.x86_const as X
        from unicorn.unicorn_py3.arch.intel import HOOK_INSN_IN_CFUNC, HOOK_INSN_OUT_CFUNC
        from unicorn.unicorn_py3.unicorn import MMIO_READ_CFUNC, MMIO_WRITE_CFUNC, uc_hook_h, uclib
    except ImportError as exc:
        log.info("software CPU: port and MMIO hooks go through the Unicorn binding (%s)", exc)
        return None
    if not (hasattr(uc, "_uch") and hasattr(uc, "_hook_exception")):  # its engine handle, its guard's slot
        log.info("software CPU: port and MMIO hooks go through the Unicorn binding (no _uch/_hook_exception)")
        return None
    return DirectHooks(uc, uclib, {
        "in": HOOK_INSN_IN_CFUNC, "out": HOOK_INSN_OUT_CFUNC, "mmio_read": MMIO_READ_CFUNC,
        "mmio_write": MMIO_WRITE_CFUNC, "handle": uc_hook_h, "hook_insn": U.UC_HOOK_INSN,
        "insn_in": X.UC_X86_INS_IN, "insn_out": X.UC_X86_INS_OUT, "error": U.UcError})
