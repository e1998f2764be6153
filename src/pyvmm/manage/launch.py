"""Starting a VM in the background, and waiting for a VM's process to end.

The VM gets a process of its own (pyvmm.manage.vmprocess) in a new session, with its
output in RUN_DIR/vmm.log, so neither the terminal nor the launcher going away touches it.
The launcher blocks on a pipe until the VM's process says "ok" (its API socket is serving
and the VM is started) or sends the one-line error that stopped it; no polling.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from .records import RunDir, VmExists

READY_TIMEOUT = 900.0  # the first start may build the default guest image


class StartError(UserError):
    """The VM's process could not start the VM."""


def launch(run: RunDir, document: dict[str, Any], *, instance_id: str | None = None,
           timeout: float = READY_TIMEOUT, incoming: str | None = None,
           restore: dict[str, Any] | None = None) -> int:
    """Start the VM described by `document` (a checked definition) in RUN_DIR; its pid.
    `incoming`: instead of booting, wait for a live migration at that address (the process
    is ready once it listens). `restore`: a PUT /snapshot/load body: the VM's process loads
    that snapshot instead of booting (`document` is then the snapshot's configuration, for
    the record)."""
    pid = run.pid()
    if pid is not None:
        raise VmExists(f"{run.name} is running already (pid {pid})")
    run.prepare()
    run.definition_file.write_text(json.dumps(document))
    if restore is not None:
        (run.path / "restore.json").write_text(json.dumps(restore))
    package_root = str(Path(__file__).resolve().parents[2])  # the VM's process imports this very pyvmm
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    read_end, write_end = os.pipe()
    try:
        with open(run.vmm_log, "ab") as log:
            from ..jail import jail_options

            # a jailed VM's process is started by the jailer (manage/jailer.py), which keeps it
            module = "pyvmm.manage.jailer" if jail_options(document) is not None else "pyvmm.manage.vmprocess"
            argv = [sys.executable, "-m", module, str(run.path), "--ready-fd", str(write_end)]
            if instance_id:
                argv += ["--id", instance_id]
            if incoming:
                argv += ["--incoming", incoming]
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                       start_new_session=True, pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        answer, ended = _read_answer(read_end, timeout)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if answer == "ok":
        return run.pid() or process.pid  # the VM's own (with seccomp on, a parent waits for it)
    if answer is None:
        if ended:  # the process closed the pipe without a word: it is ending (a jail's keeper cleans up first)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        last = run.last_log_line()
        if process.poll() is None:
            raise StartError(f"{run.name} did not start within {timeout:.0f} s (see {run.vmm_log})")
        raise StartError(f"{run.name}: the VM's process ended at start" + (f": {last}" if last else ""))
    raise StartError(f"{run.name}: {answer.removeprefix('error: ')}")


def _read_answer(fd: int, timeout: float) -> tuple[str | None, bool]:
    """The process's one-line answer (None if none came) and whether it closed the pipe."""
    data = b""
    while b"\n" not in data:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return None, False
        chunk = os.read(fd, 4096)
        if not chunk:
            return None, True  # the process ended without a word
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace"), False


def wait_exit(pid: int, timeout: float | None) -> bool:
    """Wait until process `pid` has ended (True) or `timeout` passed (False)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)
