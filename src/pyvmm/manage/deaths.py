"""Why a VM's process died without recording an outcome, when the kernel knows: a process
killed by seccomp (SIGSYS) leaves a record in the kernel log (`audit: type=1326 ... pid=N
comm="THREAD" sig=31 syscall=NR`), naming the thread and the call. No extra process has to
wait for the VM's to find out. Reading the kernel log needs root (or dmesg_restrict=0);
without it the death stays unexplained, as before.
"""

from __future__ import annotations

import os
import re

_SECCOMP_KILL = re.compile(r'type=1326 .*?pid=(\d+) comm="([^"]*)".*? sig=31 .*?syscall=(\d+)')


def _kernel_log() -> list[tuple[float, str]]:
    """(seconds since boot, message) of each record in the kernel's ring buffer (/dev/kmsg)."""
    records: list[tuple[float, str]] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return records
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten meanwhile; go on with the next
                continue
            header, _, message = record.partition(";")
            fields = header.split(",")
            if len(fields) >= 3:
                records.append((int(fields[2]) / 1e6, message.strip()))
    finally:
        os.close(fd)
    return records


def seccomp_kill(pid: int, started_ticks: int | None) -> str | None:
    """'SIGSYS: NAME on thread COMM' if the kernel log says seccomp killed process `pid`
    (started `started_ticks` clock ticks after boot), else None."""
    since = 0.0 if started_ticks is None else started_ticks / os.sysconf("SC_CLK_TCK")
    for when, message in reversed(_kernel_log()):
        match = _SECCOMP_KILL.search(message)
        if match and int(match.group(1)) == pid and when >= since:
            from ..seccomp.libseccomp import syscall_name

            try:
                call = syscall_name(int(match.group(3)))
            except Exception:  # noqa: BLE001 - libseccomp missing: the number still says it
                call = f"system call {match.group(3)}"
            return f"SIGSYS: {call} on thread {match.group(2)}"
    return None
