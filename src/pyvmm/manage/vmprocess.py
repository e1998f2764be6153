"""The process of one managed VM: `python -m pyvmm.manage.vmprocess RUN_DIR --ready-fd N`.

It serves the API and the console sockets in RUN_DIR, boots the configuration in
RUN_DIR/definition.json (or, when RUN_DIR/restore.json is there, loads the snapshot it names:
a PUT /snapshot/load body), tells the launcher on the ready pipe ("ok", or the one-line error
that stopped it), and lives as long as the VM: when the VM stops for good it writes
outcome.json, removes its sockets and exits with the outcome's status. SIGTERM and SIGINT
destroy the VM the same way, so the outcome is always recorded; only SIGKILL (or a crash
of the interpreter) leaves a record without an outcome, which `list` reports as crashed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .. import start_up
from ..errors import UserError, user_error_message
from .records import RunDir


def _outcome_record(outcome, boots: int, migration=None) -> dict:
    record = {"reason": outcome.reason, "status": outcome.status, "message": outcome.message, "boots": boots,
              "ended_at": time.time()}
    if migration is not None:  # the last outgoing migration's figures (a migrated VM's record keeps them)
        record["migration"] = migration.progress().to_dict()
    return record


def serve(run: RunDir, instance_id: str, ready_fd: int | None, incoming: str | None = None, *,
          jailed: bool = False) -> int:
    from ..api.console import ConsoleHub
    from ..api.instance import VmInstance
    from ..api.schema import VmSpec
    from ..api.server import ApiServer

    def tell(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, message.encode() + b"\n")
            finally:
                os.close(ready_fd)
                ready_fd = None

    # SIGTERM/SIGINT destroy the VM with an outcome, from before the pid file exists (anyone who
    # sees it may signal us; the default action would leave a record without an outcome, listed
    # as crashed). One that comes before the VM exists is acted on once it does.
    stop_signals: list[str] = []
    made: list[VmInstance] = []

    def on_signal(signum, _frame) -> None:
        stop_signals.append(f"stopped by signal {signal.Signals(signum).name}")
        if made:
            threading.Thread(target=_destroy, args=(made[0], stop_signals[-1]), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal that started us may go away
    if not jailed:  # a jail's keeper has recorded this process's pid as the host sees it
        run.write_pid()
    console = ConsoleHub(run.console_log)
    restore_file = run.path / "restore.json"
    try:
        restore = json.loads(restore_file.read_text()) if restore_file.exists() else None
        spec = VmSpec() if restore is not None else VmSpec.from_document(json.loads(run.definition_file.read_text()))
        from .. import seccomp

        # helpers: the API may hot-plug a tap=auto NIC, whose network namespace `ip` makes (not in
        # a jail: it has no `ip` and no privilege, its jailer makes its TAPs)
        seccomp.configure(spec.pyvmm.get("seccomp") or seccomp.default_mode(), helpers=not jailed)
        from ..host.cpu_affinity import place_vm_threads
        place_vm_threads()  # the VM's threads on one host CPU (software CPU)
        instance = VmInstance(instance_id, spec, console=console)
        made.append(instance)
        done = threading.Event()
        instance.on_end(lambda outcome: done.set())
        console.serve(run.console_sock)
        server = ApiServer(instance, run.api_sock).start()
    except (UserError, OSError) as exc:
        console.close()
        message = user_error_message(exc)
        run.write_outcome({"reason": "failed", "status": 2, "message": message, "boots": 0, "ended_at": time.time()})
        tell(f"error: {message}")
        return 2

    try:
        if restore is not None:
            restore_file.unlink()        # a later start boots the definition
            instance.load_snapshot(restore)
        elif incoming is None:
            instance.start()
        else:
            instance.listen_for_migration(incoming)
    except Exception as exc:  # noqa: BLE001 - whatever stops the boot is the outcome, in one line
        message = user_error_message(exc) if isinstance(exc, (UserError, OSError)) else \
            f"internal error: {type(exc).__name__}: {exc}"
        logging.getLogger("pyvmm").debug("start failed", exc_info=True)
        server.close()
        console.close()
        run.write_outcome({"reason": "failed", "status": 2, "message": message, "boots": 0, "ended_at": time.time()})
        tell(f"error: {message}")
        return 2
    tell("ok")
    if stop_signals:  # signalled before the VM was started: nothing was there to stop then
        _destroy(instance, stop_signals[0])
    while not done.wait(1.0):  # a timed wait: the main thread stays responsive to signals
        pass
    outcome = instance.outcome
    assert outcome is not None  # the VM ended: on_end ran after the outcome was recorded
    run.write_outcome(_outcome_record(outcome, instance.boots, instance.migration))
    server.close()
    console.close()
    for path in (run.console_sock,):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    print(f"pyvmm: {outcome.message}", file=sys.stderr)
    return outcome.status


def _destroy(instance, message: str) -> None:
    try:
        instance.stop(message)
    except UserError:
        pass  # not started yet or stopped already


# How a VM whose process seccomp killed is reported (manage/deaths.py reads the kernel's record
# of it; a jail's keeper sees the SIGSYS itself).
SECCOMP_KILLED = "was killed by seccomp"
SECCOMP_WHY = "a system call outside its allow-list, pyvmm/seccomp/allowlist.py; the kernel log names it: audit type=1326"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyvmm-vm", description="the process of one managed VM (internal)")
    parser.add_argument("run_dir")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--id", help="the instance id the API reports (default: the run directory's name)")
    parser.add_argument("--incoming", metavar="ADDRESS", help="wait for a live migration at unix:PATH or tcp:HOST:PORT "
                        "instead of booting")
    parser.add_argument("--jailed", action="store_true", help="started by the jailer (pyvmm.jail), which keeps "
                        "the pid file and reports a death by seccomp")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    start_up.begin()  # dataclass code reused; the heap frozen when the VM starts
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s pyvmm: %(levelname)s: %(name)s: %(message)s")
    run = RunDir(Path(args.run_dir).resolve())
    return serve(run, args.id or run.name, args.ready_fd, args.incoming, jailed=args.jailed)


if __name__ == "__main__":
    sys.exit(main())
