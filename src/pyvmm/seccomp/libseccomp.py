"""A small ctypes binding to libseccomp (libseccomp.so.2), the library that compiles
allow-lists into seccomp BPF programs: pyvmm never assembles BPF by hand.

Only what pyvmm uses: a filter context with a default action, rules on a system call with
optional argument comparisons, the thread-sync and no-new-privileges attributes, load and
export. Constants are libseccomp's (seccomp.h, stable ABI since 2.x).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from ..errors import UserError

# Actions (seccomp.h).
ACT_KILL_PROCESS = 0x80000000
ACT_KILL_THREAD = 0x00000000
ACT_TRAP = 0x00030000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000


def act_errno(errno: int) -> int:
    return 0x00050000 | (errno & 0xFFFF)


# Filter attributes (enum scmp_filter_attr).
_ATTR_ACT_DEFAULT = 1
_ATTR_CTL_NNP = 3
_ATTR_CTL_TSYNC = 4

# Argument comparisons (enum scmp_compare).
CMP_EQ = 4
CMP_MASKED_EQ = 7


class SeccompUnavailable(UserError):
    """libseccomp is missing or the kernel refused the filter."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@dataclass(frozen=True)
class ArgCmp:
    """One comparison on a system call argument: (args[index] & mask) == value."""

    index: int
    value: int
    mask: int = 0xFFFFFFFFFFFFFFFF

    def native(self) -> _ArgCmp:
        if self.mask == 0xFFFFFFFFFFFFFFFF:
            return _ArgCmp(self.index, CMP_EQ, self.value, 0)
        return _ArgCmp(self.index, CMP_MASKED_EQ, self.mask, self.value)


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = "libseccomp.so.2"  # (find_library would run ldconfig, which a jail does not have)
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            raise SeccompUnavailable("seccomp needs libseccomp (apt-get install libseccomp2)") from None
        lib.seccomp_init.argtypes = (ctypes.c_uint32,)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_release.argtypes = (ctypes.c_void_p,)
        lib.seccomp_release.restype = None
        lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
        lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp))
        lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        lib.seccomp_load.argtypes = (ctypes.c_void_p,)
        lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
        _lib = lib
    return _lib


def syscall_number(name: str) -> int | None:
    """The native architecture's number of system call `name`, None if it has none."""
    number = library().seccomp_syscall_resolve_name(name.encode())
    return None if number < 0 else number


class Filter:
    """A seccomp filter under construction: rules added, then load()ed into this thread
    (tsync=True: into every thread of the process)."""

    def __init__(self, default_action: int) -> None:
        self._lib = library()
        self._ctx = self._lib.seccomp_init(default_action)
        if not self._ctx:
            raise SeccompUnavailable("seccomp_init failed")

    def _attr(self, attr: int, value: int) -> None:
        rc = self._lib.seccomp_attr_set(self._ctx, attr, value)
        if rc < 0:
            raise SeccompUnavailable(f"seccomp_attr_set({attr}): {os.strerror(-rc)}")

    def add(self, action: int, syscall: str, *conditions: ArgCmp) -> None:
        number = syscall_number(syscall)
        if number is None:
            return  # not a system call on this architecture (e.g. a 32-bit-only name)
        array = (_ArgCmp * max(len(conditions), 1))(*[c.native() for c in conditions])
        rc = self._lib.seccomp_rule_add_array(self._ctx, action, number, len(conditions), array)
        if rc < 0:
            raise SeccompUnavailable(f"seccomp rule for {syscall}: {os.strerror(-rc)}")

    def load(self, *, tsync: bool) -> None:
        if tsync:
            self._attr(_ATTR_CTL_TSYNC, 1)
        rc = self._lib.seccomp_load(self._ctx)
        if rc < 0:
            raise SeccompUnavailable(f"cannot install the seccomp filter: {os.strerror(-rc)}")

    def export_bpf(self, fd: int) -> None:
        rc = self._lib.seccomp_export_bpf(self._ctx, fd)
        if rc < 0:
            raise SeccompUnavailable(f"seccomp_export_bpf: {os.strerror(-rc)}")

    def close(self) -> None:
        if self._ctx:
            self._lib.seccomp_release(self._ctx)
            self._ctx = None

    def __enter__(self) -> "Filter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def syscall_name(number: int) -> str:
    """The name of the native architecture's system call `number` (for reports)."""
    lib = library()
    lib.seccomp_syscall_resolve_num_arch.argtypes = (ctypes.c_uint32, ctypes.c_int)
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
    pointer = lib.seccomp_syscall_resolve_num_arch(0, number)  # 0: the native architecture
    if not pointer:
        return f"syscall {number}"
    name = ctypes.string_at(pointer).decode()
    ctypes.CDLL(None).free(ctypes.c_void_p(pointer))
    return name
