"""Landlock (Linux 5.13+): the jailed VM process confines itself to the paths it was given.

A ruleset handles the file-system rights of the kernel's Landlock ABI (up to version 3:
truncate); each exposed path gets read-only or read-write rights beneath it; then the
process (already no_new_privs) restricts itself, for good and for whatever it executes.
From ABI 6 it also scopes the process: it can neither connect to an abstract Unix socket nor
signal a process created outside its Landlock domain (abstract sockets have no path, so the
jail's mount namespace does not hide them; without a network namespace of its own a jailed VM
would otherwise reach any host service or other VM listening on one).
Device ioctls (ABI 5) are not handled: KVM's and the TAP's ioctls are seccomp's to filter; nor is
TCP (ABI 4): a jailed VM may migrate to an address its API is given at run time.
"""

from __future__ import annotations

import ctypes
import os
import struct

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE = 1 << 13, 1 << 14
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1    # ABI 6
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE   # the rights a rule on a file (not a directory) may hold

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is not built in or not enabled."""
    version = _libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(int(version), 0)


def handled_rights(abi: int) -> int:
    rights = (1 << 13) - 1        # ABI 1: execute .. make_sym
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    return rights


def restrict_to(paths: list[tuple[str, bool]]) -> int:
    """Allow only `paths` ((path, writable) pairs: everything beneath each) from now on.
    Returns the ABI version used; 0 (nothing done) where the kernel has no Landlock."""
    abi = abi_version()
    if abi == 0:
        return 0
    handled = handled_rights(abi)
    read_only = EXECUTE | READ_FILE | READ_DIR
    # struct landlock_ruleset_attr: handled file-system rights, handled network rights (none), scopes
    attr = struct.pack("=QQQ", handled, 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else \
        struct.pack("=Q", handled)
    ruleset = _libc.syscall(SYS_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path, writable in paths:
            allowed = handled if writable else read_only
            if not os.path.isdir(path):
                allowed &= FILE_RIGHTS
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", allowed & handled, fd)
                if _libc.syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), rule,
                                 ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
        if _libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    return abi
