"""seccomp for VM processes: a process-wide allow-list installed once the VM is set up, and a
tighter one per guest-facing thread (allowlist.py lists both, with the reasons).

Filters stack and are inherited by threads created later, and TSYNC (one filter into every
thread) fails once a thread has a filter of its own, so the order is fixed:
1. `configure(mode)` in the VM process's entry point (the CLI, the managed VM's process);
   library use (pyvmm.Sandbox, build_vm in a program) never filters its caller's process.
2. `install_process_filter()` from Vm.start(), before the VM's threads exist: every thread of
   the process (API, console, main) gets the `process` filter, with TSYNC, once.
3. `enter_thread(kind)` first thing in each vCPU, software-CPU and I/O thread: its kind's
   filter on top, for that thread only.
Modes: off (nothing installed), log (a call outside the list is allowed and logged by the
kernel, `audit: type=1326`, with the thread's name), kill (the whole process dies of SIGSYS).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

from ..errors import UserError

MODES = ("kill", "log", "off")
ENV = "PYVMM_SECCOMP"           # the default of --seccomp and of a definition's [pyvmm] seccomp
_PR_SET_NAME = 15

log = logging.getLogger(__name__)
_lock = threading.Lock()
_mode = "off"
_process_installed = False
_helpers = False
_rebuilds = True


def check_mode(mode: str, field: str = "--seccomp") -> str:
    if mode not in MODES:
        raise UserError(f"{field} must be one of {', '.join(MODES)} (got {mode!r})")
    return mode


def default_mode() -> str:
    """The mode PYVMM_SECCOMP asks for; when unset, kill (the whole suite passes under it),
    or off with a warning on a host without libseccomp."""
    asked = os.environ.get(ENV)
    if asked:
        return check_mode(asked, ENV)
    from .libseccomp import SeccompUnavailable, library

    try:
        library()
    except SeccompUnavailable as exc:
        log.warning("no system-call filters: %s", exc)
        return "off"
    return "kill"


def configure(mode: str, *, helpers: bool = False, rebuilds: bool = True) -> None:
    """Set this process's mode (a VM process's entry point does, before building a VM).
    `helpers`: the process may start helper programs after set-up whatever its machine is (a
    managed VM's API can hot-plug a tap=auto NIC, whose namespace `ip` makes). `rebuilds`: it
    may build a machine again once one has started (a reboot, an API's snapshot load or
    migration); False leaves set-up out of the process-wide filter (allowlist.REBUILD_ONLY)."""
    global _mode, _helpers, _rebuilds
    check_mode(mode)
    with _lock:
        if _process_installed and mode != _mode:
            raise UserError("seccomp is installed in this process already: its mode cannot change")
        _mode = mode
        _helpers = helpers
        _rebuilds = rebuilds
    if mode != "off":
        from .libseccomp import library

        library()  # libseccomp missing: one line now, not at the VM's start


def mode() -> str:
    return _mode


def installed() -> bool:
    return _process_installed


def _default_action() -> int:
    from .libseccomp import ACT_KILL_PROCESS, ACT_LOG

    return ACT_KILL_PROCESS if _mode == "kill" else ACT_LOG


def build_filter(kind: str, *, spawn: bool = False, rebuilds: bool = True, default_action: int | None = None):
    """The libseccomp filter of `kind` (allowlist.KINDS), not loaded."""
    from .allowlist import ANSWERED_ENOSYS, rules_for
    from .libseccomp import ACT_ALLOW, Filter, act_errno

    seccomp_filter = Filter(_default_action() if default_action is None else default_action)
    try:
        for rule in rules_for(kind, spawn=spawn, pid=os.getpid(), rebuilds=rebuilds):
            seccomp_filter.add(ACT_ALLOW, rule.syscall, *rule.conditions)
        for name, number in ANSWERED_ENOSYS.items():
            seccomp_filter.add(act_errno(number), name)
    except BaseException:
        seccomp_filter.close()
        raise
    return seccomp_filter


def install_process_filter(*, spawn: bool = False) -> None:
    """The `process` filter into every thread, once (later calls do nothing). `spawn`: the
    machine runs helper programs after set-up (a tap=auto NIC's `ip`)."""
    global _process_installed
    with _lock:
        if _mode == "off" or _process_installed:
            return
        with build_filter("process", spawn=spawn or _helpers, rebuilds=_rebuilds) as seccomp_filter:
            seccomp_filter.load(tsync=True)
        _process_installed = True
    log.info("seccomp (%s): the process filter is installed", _mode)


def name_thread(name: str) -> None:
    """The kernel's name for this thread (top -H, the kernel's seccomp log), 15 bytes at most."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def enter_thread(kind: str, name: str) -> None:
    """First thing in a guest-facing thread: name it, then stack its kind's filter on it."""
    name_thread(name)
    if _mode == "off" or not _process_installed:
        return
    with build_filter(kind) as seccomp_filter:
        seccomp_filter.load(tsync=False)
