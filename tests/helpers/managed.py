"""A private pyvmm host for a test of managed VMs (tests/manage): its own config and run
directories, and a teardown after which none of its VM processes is left; reading a VM's
console socket."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

from pyvmm.manage.client import connect
from pyvmm.manage.launch import wait_exit


def managed_env(tmp_path, *, inherit_seccomp: bool = True):
    """(environment, Host) of a private pyvmm host under tmp_path; stops its VMs at the end.
    `inherit_seccomp=False`: the VMs get pyvmm's default seccomp mode, not $PYVMM_SECCOMP's."""
    values = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), XDG_RUNTIME_DIR=str(tmp_path / "rt"))
    if not inherit_seccomp:
        values.pop("PYVMM_SECCOMP", None)
    host = connect(tmp_path / "cfg" / "pyvmm" / "vms", tmp_path / "rt" / "pyvmm")
    yield values, host
    stop_every_vm(host)


def stop_every_vm(host) -> None:
    """End every VM process of `host`: SIGTERM first, so each closes what outlives a SIGKILLed
    process (its network namespace, its socket files), then SIGKILL what is left after 10 s.
    Each is gone (not merely signalled) when this returns, so the next test starts clean."""
    pids = [pid for pid in (host.vm(name).run.pid() for name in host.names()) if pid is not None]
    for sig, patience in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        pids = [pid for pid in pids if not wait_exit(pid, patience)]
    assert not pids, f"VM processes {pids} outlived SIGKILL"


def describe_vms(host, log_tail: int = 2048, console_tail: int = 4096) -> str:
    """Each VM of `host`: its state and outcome, the oops lines of its console, the tails of its
    process log and console (for a failed test's report)."""
    from pyvmm.images.kernel_warnings import oops_lines

    parts = []
    for name in host.names():
        vm = host.vm(name)
        try:
            info = vm.info()
            console = vm.console_history()
        except Exception as exc:   # a report must not fail on a half-dead VM
            parts.append(f"--- {name}: not described: {exc}")
            continue
        try:
            log = vm.run.vmm_log.read_bytes()[-log_tail:].decode(errors="replace")
        except OSError:
            log = ""
        oops = " | ".join(oops_lines(console))
        parts.append(f"--- {name}: {info.state} pid={info.pid} outcome={info.outcome}\n"
                     f"oops: {oops or '-'}\n--- {name} vmm.log tail:\n{log}\n"
                     f"--- {name} console tail:\n{console[-console_tail:].decode(errors='replace')}")
    return "\n".join(parts) or "no VMs"


def read_until(conn: socket.socket, pattern: bytes, timeout: float = 300) -> bytes:
    """Console output until `pattern` (a regex) appears, within `timeout` seconds in all (a
    guest that keeps printing something else must not keep the test waiting)."""
    deadline = time.monotonic() + timeout
    data = b""
    while not re.search(pattern, data):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} on the console within {timeout} s; got {data[-500:]!r}"
        conn.settimeout(left)
        chunk = conn.recv(65536)
        assert chunk, f"the console closed; got {data[-500:]!r}"
        data += chunk
    return data


def ticks(data: bytes) -> list[int]:
    """The numbers of the `tick-N` lines a guest's ticker loop printed."""
    return [int(n) for n in re.findall(rb"tick-(\d+)\r?\n", data)]
