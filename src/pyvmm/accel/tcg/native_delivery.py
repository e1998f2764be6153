"""Guest exceptions delivered by the translator's own x86 code, without a trip through Python.

Unicorn never delivers a guest exception (#PF, #GP, INT n, ...) through the IDT: it stops and
calls the UC_HOOK_INTR hooks. pyvmm's Python delivery (delivery.py) costs about 100 us per
exception, and a booting Linux guest takes thousands of them (user-space page faults, mostly).
libunicorn still contains QEMU's delivery and exports it: x86_cpu_do_interrupt(CPUState *),
with gates, privilege and stack switches, IST, error codes, real and 32-bit modes, and the
escalation of a fault during delivery to #DF and to a triple fault.

That function must run inside Unicorn's CPU loop, as QEMU runs it: a fault while delivering
(a stack page not present, say) unwinds to the loop with longjmp. From a Python callback the
longjmp would cross the interpreter's frames; so the hook is a three-instruction x86-64
trampoline in an executable page, which counts the exception and tail-calls
x86_cpu_do_interrupt with the engine's CPUState:

    incq 0x10(%rdx)      ; hook data (the hook's third argument): delivered += 1
    movq (%rdx), %rdi    ; first argument: the CPUState
    jmp *0x8(%rdx)       ; x86_cpu_do_interrupt(cpu), returning straight to Unicorn

A triple fault makes QEMU stop the CPU and leaves its old_exception at #DF, where a successful
delivery resets it; the vCPU checks that when emu_start returns.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform

log = logging.getLogger(__name__)

TRAMPOLINE = bytes.fromhex("48ff4210" "488b3a" "ff6208")
DELIVERY_FUNCTION = "x86_cpu_do_interrupt_x86_64"


class _HookData(ctypes.Structure):
    # the layout the trampoline reads
    _fields_ = [("cpu", ctypes.c_void_p), ("deliver", ctypes.c_void_p), ("delivered", ctypes.c_uint64)]


def _executable_copy(code: bytes) -> mmap.mmap:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of the exception trampoline failed")
    return page


class NativeExceptionDelivery:
    """The installed hook of one Unicorn instance; `delivered` counts the exceptions it took."""

    def __init__(self, page: mmap.mmap, data: _HookData, handle) -> None:
        self._page, self._data, self._handle = page, data, handle  # kept alive with the engine

    @property
    def delivered(self) -> int:
        return self._data.delivered

    @classmethod
    def install(cls, uc, cpu_address: int) -> "NativeExceptionDelivery | None":
        """Hook the trampoline into `uc`; None (the caller hooks the Python delivery instead)
        when this host or libunicorn build cannot run it."""
        from unicorn.unicorn_const import UC_HOOK_INTR
        from unicorn.unicorn_py3.arch.types import uc_hook_h
        from unicorn.unicorn_py3.unicorn import uclib

        if platform.machine() not in ("x86_64", "AMD64"):
            log.info("software CPU: exceptions are delivered in Python (the trampoline is x86-64 code)")
            return None
        try:
            deliver = ctypes.cast(getattr(uclib, DELIVERY_FUNCTION), ctypes.c_void_p).value
        except AttributeError:
            log.info("software CPU: exceptions are delivered in Python (libunicorn exports no %s)",
                     DELIVERY_FUNCTION)
            return None
        try:
            page = _executable_copy(TRAMPOLINE)
        except OSError as exc:
            log.info("software CPU: exceptions are delivered in Python (no executable page: %s)", exc)
            return None
        data = _HookData(cpu_address, deliver, 0)
        handle = uc_hook_h()
        trampoline = ctypes.addressof(ctypes.c_char.from_buffer(page))
        status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INTR, ctypes.c_void_p(trampoline),
                                   ctypes.c_void_p(ctypes.addressof(data)), ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status:
            log.info("software CPU: exceptions are delivered in Python (uc_hook_add failed: %d)", status)
            return None
        return cls(page, data, handle)
