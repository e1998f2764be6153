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

INT n, INT3 and INTO: Unicorn moves EIP past the instruction before its hook runs (for the
hook's sake; QEMU's delivery pushes exception_next_eip anyway), so a fault raised while
delivering one (#NP, #GP, #TS, a #PF on the stack) saved the next instruction's address,
where the SDM has the INT's own (a fault). On the libunicorn build whose CPUState layout pyvmm
knows (x86_cpu_do_interrupt checked byte for byte), the trampoline first moves EIP back:

    if (env->exception_is_int) {
        env->eip = env->exception_next_eip - 2;             /* INT n: CD ib */
        if (vector == 3 || vector == 4)                     /* INT3 (CC), INTO (CE): one byte */
            if (cpu_ldub_code(env, cs.base + next_eip - 1) == (vector == 3 ? 0xCC : 0xCE))
                env->eip += 1;
    }

(A prefixed INT n is taken as starting at its opcode.) Other builds get the short trampoline.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os

log = logging.getLogger(__name__)

TRAMPOLINE = bytes.fromhex("48ff4210" "488b3a" "ff6208")
# The same with the INT's EIP restored (see above), for the build whose offsets it uses:
# CPUState.exception_index 0x81a0, env at 0x8a50 (eip +0x80, CS base +0xd8),
# env.error_code 0x9f58, env.exception_is_int 0x9f5c, env.exception_next_eip 0x9f60.
INT_EIP_TRAMPOLINE = bytes.fromhex(
    "48ff4210" "488b3a"                 # delivered += 1; rdi = CPUState
    "83bf5c9f000000" "745b"             # exception_is_int? else deliver
    "488b87609f0000" "488d48fe" "48898fd08a0000"   # eip = next_eip - 2
    "8b8fa0810000" "83e903" "83f901" "773b"        # vector 3 or 4? else deliver
    "52" "57" "4883ec08" "488dbf508a0000" "488d70ff" "4803b7d8000000"
    "ff5218"                            # al = cpu_ldub_code(env, cs.base + next_eip - 1)
    "4883c408" "5f" "5a"
    "83bfa081000003" "7506" "3ccc" "7406" "eb0b" "3cce" "7507"
    "48ff87d08a0000"                    # INT3 / INTO: eip += 1
    "ff6208")                           # x86_cpu_do_interrupt(cpu)
DELIVERY_FUNCTION = "x86_cpu_do_interrupt_x86_64"
CODE_BYTE_FUNCTION = "cpu_ldub_code_x86_64"
# x86_cpu_do_interrupt of the build INT_EIP_TRAMPOLINE's offsets come from (its first bytes,
# which read exception_index, exception_is_int, error_code and exception_next_eip)
KNOWN_DELIVERY = bytes.fromhex(
    "538bb7a0810000" "4889fb" "8b8f589f0000" "81feff000000" "7e18" "4863d1" "81ee00010000"
    "488dbf508a0000" "5b" "e9e222f6ff" "6690" "8b975c9f0000" "4c8b87609f0000")


class _HookData(ctypes.Structure):
    # the layout the trampolines read
    _fields_ = [("cpu", ctypes.c_void_p), ("deliver", ctypes.c_void_p), ("delivered", ctypes.c_uint64),
                ("load_code_byte", ctypes.c_void_p)]


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

        if os.uname().machine not in ("x86_64", "AMD64"):
            log.info("software CPU: exceptions are delivered in Python (the trampoline is x86-64 code)")
            return None
        try:
            deliver = ctypes.cast(getattr(uclib, DELIVERY_FUNCTION), ctypes.c_void_p).value
        except AttributeError:
            log.info("software CPU: exceptions are delivered in Python (libunicorn exports no %s)",
                     DELIVERY_FUNCTION)
            return None
        code_byte = getattr(uclib, CODE_BYTE_FUNCTION, None)
        known = deliver is not None and code_byte is not None \
            and ctypes.string_at(deliver, len(KNOWN_DELIVERY)) == KNOWN_DELIVERY
        if not known:
            log.info("software CPU: an exception raised delivering INT n saves the next EIP "
                     "(this libunicorn's CPU layout is not the one pyvmm knows)")
        try:
            page = _executable_copy(INT_EIP_TRAMPOLINE if known else TRAMPOLINE)
        except OSError as exc:
            log.info("software CPU: exceptions are delivered in Python (no executable page: %s)", exc)
            return None
        load_code_byte = ctypes.cast(code_byte, ctypes.c_void_p).value if code_byte is not None and known else None
        data = _HookData(cpu_address, deliver, 0, load_code_byte)
        handle = uc_hook_h()
        trampoline = ctypes.addressof(ctypes.c_char.from_buffer(page))
        status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INTR, ctypes.c_void_p(trampoline),
                                   ctypes.c_void_p(ctypes.addressof(data)), ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status:
            log.info("software CPU: exceptions are delivered in Python (uc_hook_add failed: %d)", status)
            return None
        return cls(page, data, handle)
