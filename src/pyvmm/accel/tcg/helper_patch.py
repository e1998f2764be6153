"""Intercept engine helpers Unicorn 2.1.4 has no hook for: RDMSR, WRMSR, MOV to/from CRn, SYSRET
(and the external-interrupt entry, for interrupt-window exits: interrupt_window.py).

Unicorn's QEMU reads IA32_APIC_BASE as 0 (it has no APIC), checks no reserved bit in a MOV
to CR0/CR4 or a WRMSR to EFER, and keeps CR8 apart from the APIC's TPR; its hook API only
reaches IN, OUT, SYSCALL, SYSENTER, CPUID and RDTSC(P). So the entry of each helper the
translated code calls (helper_rdmsr_x86_64, helper_wrmsr_x86_64, helper_write_crN_x86_64,
helper_read_crN_x86_64, helper_sysret_x86_64, exported by libunicorn) is patched with a jump
to a small x86-64 stub:

    stub:        [skip: machine code that sends the cases the filter would pass through
                  straight to the helper, with no Python call]
                 save the argument registers; action = filter(env, arg1, arg2, &out)
                 (or, install_guard: machine code decides, with no Python call)
                 action 0: run the helper: its displaced first instructions, then jump back
                 action 1: return `out` (the helper's work is done)
                 action 3: run the helper with `out` as its second argument (arg1)
                 action 2: raise #GP(0) the way the helper itself would
                           (raise_exception_err_ra(env, 13, 0, return address): the engine
                           unwinds to the faulting instruction with longjmp, in C)

The displaced instructions are checked byte for byte against this build's (they save
registers and load arguments; the one position-dependent instruction, helper_sysret's first
`je rel32`, is re-encoded in the stub with an absolute target); any other libunicorn leaves the
helpers alone, logged, and the guest sees Unicorn's own behaviour. The library is shared by
the process, so the filter serves whichever vCPU is running on the calling thread
(`running`), and passes everything through when none is (the probes' scratch engines).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import threading
from typing import Callable

from ...compiled import c_module

log = logging.getLogger(__name__)

PASS, HANDLED, GENERAL_PROTECTION, PASS_WITH_ARG1 = 0, 1, 2, 3
# helper -> the instructions before its first call, which the jump overwrites (this build's)
PROLOGUES = {
    "helper_rdmsr_x86_64": bytes.fromhex("53488b4c24084889fb31d2be7c000000"),
    "helper_wrmsr_x86_64": bytes.fromhex("55488b4c24084889fdba01000000be7c000000"),
    "helper_write_crN_x86_64": bytes.fromhex("41544989d431d2554889fd534863de488b4c24188d7310"),
    "helper_read_crN_x86_64": bytes.fromhex("5531d24889fd534863de89de4883ec08488b4c2418"),
    # (interrupt_window.py) mov %edx,%r9d; sub $0x8a50,%rdi; xor %r8d,%r8d; xor %ecx,%ecx
    "do_interrupt_x86_hardirq_x86_64": bytes.fromhex("4189d1" "4881ef508a0000" "4531c0" "31c9"),
    # push %rbp; mov %rdi,%rbp; testb $1,0x250(%rdi) (EFER.SCE); je rel32 (to the #UD)
    "helper_sysret_x86_64": bytes.fromhex("554889fdf6875002000001" "0f84b5020000"),
}
# helper -> offset of a `je rel32` (0f 84) ending its prologue, relocated into the stub
RELOCATED_JE = {"helper_sysret_x86_64": 11}
RAISE_FUNCTION = "raise_exception_err_ra_x86_64"
FILTER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                          ctypes.POINTER(ctypes.c_uint64))

running = threading.local()  # .vcpu: the TcgVcpu in emu_start on this thread, or None
_installed: dict[str, tuple] = {}  # helper -> (its filter, stub page, address, bytes overwritten)
_retired: list[tuple] = []  # restored patches: their stubs stay mapped
_filter_slots: dict[str, int] = {}  # helper -> its C filter slot (hook_trampolines.c), kept across re-patches
_lock = threading.Lock()


def _jump(target: int) -> bytes:
    return bytes.fromhex("ff2500000000") + struct.pack("<Q", target)  # jmp *0(%rip)


def _displaced(prologue: bytes, target: int, je_at: int | None) -> bytes:
    """The prologue as the stub runs it, then a jump back behind it in the helper."""
    if je_at is None:
        return prologue + _jump(target + len(prologue))
    destination = target + je_at + 6 + struct.unpack("<i", prologue[je_at + 2:je_at + 6])[0]
    far = _jump(destination)
    # jne over an absolute jump to the je's destination
    return prologue[:je_at] + bytes([0x75, len(far)]) + far + _jump(target + len(prologue))


JE, JNE, JBE = 0x84, 0x85, 0x86  # the condition byte of `0f cc rel32`


def branches(tests: list[tuple[bytes, int]], distance: int) -> bytes:
    """Machine code for a skip: each (test, condition) runs `test` (instructions that set the
    flags; they may clobber %rax, %r10, %r11, which no helper receives arguments in), then jumps
    `distance` bytes past the end of the whole sequence when the condition holds; it falls
    through after the last."""
    size = sum(len(test) + 6 for test, _ in tests)
    code = b""
    for test, condition in tests:
        code += test
        after = len(code) + 6
        code += bytes([0x0F, condition]) + struct.pack("<i", size + distance - after)
    return code


def _stub(callback: int, raise_function: int, passthrough: bytes,
          skip: Callable[[int], bytes] | None = None) -> bytes:
    head = bytes.fromhex("57" "56" "52" "51" "4883ec18" "488d4c2408" "48b8") + struct.pack("<Q", callback)
    head += bytes.fromhex("ffd0" "4c8b5c2408" "4883c418" "59" "5a" "5e" "5f" "85c0")
    handled = bytes.fromhex("4c89d8" "c3")                       # mov %r11,%rax; ret
    raise_gp = _raise_gp(raise_function)
    # test %eax,%eax; jz passthrough; cmp $3,%eax; jne 1f; mov %r11,%rsi; jmp passthrough;
    # 1: cmp $1,%eax; jne raise; handled; raise; passthrough
    rest = bytes.fromhex("83f801") + bytes([0x75, len(handled)]) + handled + raise_gp
    with_arg1 = bytes.fromhex("83f803" "7505" "4c89de") + bytes([0xEB, len(rest)])
    after_jz = with_arg1 + rest
    python = head + bytes([0x74, len(after_jz)]) + after_jz
    return (skip(len(python)) if skip is not None else b"") + python + passthrough


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _writable_text(address: int, length: int, write: Callable[[], object]) -> None:
    libc, page = _libc(), mmap.PAGESIZE
    start = address & ~(page - 1)
    size = ((address + length + page - 1) & ~(page - 1)) - start
    rwx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    if libc.mprotect(start, size, rwx) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of libunicorn's text failed")
    try:
        write()
    finally:
        libc.mprotect(start, size, mmap.PROT_READ | mmap.PROT_EXEC)


def install(helper: str, handler: Callable[[int, int, int], tuple[int, int]],
            skip: Callable[[int], bytes] | None = None) -> bool:
    """Route `helper` through handler(env, arg1, arg2) -> (action, value); False if this build
    of libunicorn cannot be patched (the helper then runs as Unicorn built it). `skip(distance)`:
    machine code (see `branches`) that jumps `distance` bytes past its end, straight to the
    helper, for the calls the handler would pass through anyway: a call into Python costs
    microseconds, and the guest makes some of these thousands of times a second."""
    def failed(exc: BaseException) -> None:  # never unwind through C: the helper runs instead
        log.error("software CPU: %s filter failed", helper, exc_info=exc)

    callback_address = _c_filter(helper, handler, failed)
    callback: object = None
    if callback_address is None:  # no build (or no free slot): a ctypes callback does the same
        def on_call(env, arg1, arg2, out) -> int:
            try:
                action, value = handler(env or 0, arg1, arg2)
            except Exception as exc:
                failed(exc)
                return PASS
            out[0] = value & 0xFFFF_FFFF_FFFF_FFFF
            return action

        callback = FILTER(on_call)
        callback_address = ctypes.cast(callback, ctypes.c_void_p).value
    assert callback_address is not None
    return _patch(helper, lambda raise_function, passthrough: _stub(callback_address, raise_function, passthrough,
                                                                     skip), keep=callback)


def _c_filter(helper: str, handler: Callable[[int, int, int], tuple[int, int]],
              failed: Callable[[BaseException], None]) -> int | None:
    """The C filter (hook_trampolines.c) of `helper`'s slot, calling `handler` from now on; None
    without the build or a free slot. A helper patched again keeps its slot."""
    trampolines = c_module("pyvmm.accel.tcg.hook_trampolines")
    if trampolines is None:
        return None
    with _lock:
        if helper in _installed:
            return None   # (_patch keeps the patch in place and returns True)
        slot = _filter_slots.setdefault(helper, len(_filter_slots))
        if slot >= trampolines.FILTER_SLOTS:
            del _filter_slots[helper]
            return None
        return trampolines.set_filter(slot, handler, failed)


def install_guard(helper: str, guard: Callable[[int], bytes]) -> bool:
    """Put machine code in front of `helper`, with no Python on the way: guard(length of the
    passthrough) is code that falls through to run the helper or ends with a jump of that
    length over it, to raise #GP(0). False if this libunicorn cannot be patched."""
    def stub(raise_function: int, passthrough: bytes) -> bytes:
        return guard(len(passthrough)) + passthrough + _raise_gp(raise_function)

    return _patch(helper, stub, keep=None)


def _raise_gp(raise_function: int) -> bytes:
    """raise_exception_err_ra(env, 13, 0, the helper's return address): never returns."""
    return bytes.fromhex("488b0c24" "be0d000000" "31d2" "48b8") + struct.pack("<Q", raise_function) + bytes.fromhex("ffe0")


def prepend(function: str, prologue: bytes, code: bytes) -> bool:
    """Run machine code `code` in front of `function`, which must start with `prologue` (this
    build's bytes, position-independent, at least a jump long): `code` falls through into the
    function. False if this libunicorn cannot be patched."""
    return _patch(function, lambda _raise, passthrough: code + passthrough, keep=None, prologue=prologue)


def replace(function: str, start: bytes, code: bytes) -> bool:
    """Run machine code `code` instead of `function`, which must start with `start` (this
    build's bytes, at least a jump long): `code` returns to the caller itself. False if this
    libunicorn cannot be patched."""
    return _patch(function, lambda _raise, _passthrough: code, keep=None, prologue=start, relocate=False)


def restore(function: str) -> None:
    """Put back what a patch overwrote at `function`'s start (its stub stays mapped: a thread
    may still be in it)."""
    with _lock:
        entry = _installed.pop(function, None)
        if entry is None:
            return
        target, original = entry[2], entry[3]
        _writable_text(target, len(original), lambda: ctypes.memmove(target, original, len(original)))
        _retired.append(entry)


def _patch(helper: str, make_stub: Callable[[int, bytes], bytes], keep: object, prologue: bytes | None = None,
           relocate: bool = True) -> bool:
    with _lock:
        if helper in _installed:
            return True
        if os.uname().machine not in ("x86_64", "AMD64"):
            return False
        from unicorn.unicorn_py3.unicorn import uclib

        try:
            target = ctypes.cast(getattr(uclib, helper), ctypes.c_void_p).value
            raise_function = ctypes.cast(getattr(uclib, RAISE_FUNCTION), ctypes.c_void_p).value
        except AttributeError:
            log.info("software CPU: libunicorn exports no %s: its behaviour stays Unicorn's", helper)
            return False
        assert target is not None and raise_function is not None
        prologue = PROLOGUES[helper] if prologue is None else prologue
        original = ctypes.string_at(target, len(prologue))
        if original != prologue:
            log.info("software CPU: %s is not the code pyvmm knows: its behaviour stays Unicorn's", helper)
            return False
        passthrough = _displaced(prologue, target, RELOCATED_JE.get(helper)) if relocate else b""
        code = make_stub(raise_function, passthrough)
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page.write(code)
        stub = ctypes.addressof(ctypes.c_char.from_buffer(page))
        if _libc().mprotect(stub, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            log.info("software CPU: no executable page for the %s stub", helper)
            return False
        patch = _jump(stub).ljust(len(prologue), b"\xcc")
        try:
            _writable_text(target, len(patch), lambda: ctypes.memmove(target, patch, len(patch)))
        except OSError as exc:
            log.info("software CPU: cannot patch %s (%s): its behaviour stays Unicorn's", helper, exc)
            return False
        _installed[helper] = (keep, page, target, original)
        return True
