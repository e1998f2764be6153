"""A migration within one process, over a Unix socket, timed end to end: what a benchmark
(benchmarks/, next to QEMU's `migrate` between two processes) and the tests call.

    vm2, figures = migrate_locally(vm, console_write)
    figures.total_s, figures.downtime_ms   # downtime: source paused -> destination resumed

The source's VM ends ("migrated"); the returned VM runs (resumed) and is the caller's.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .channel import MigrationError
from .destination import IncomingListener
from .source import Migration, MigrationOptions


@dataclass(frozen=True)
class MigrationFigures:
    total_s: float          # migrate() called -> destination resumed
    downtime_ms: float      # source paused -> destination resumed
    rounds: int
    bytes_sent: int
    pages_sent: int         # data pages (zero pages went as markers)
    zero_pages: int
    mode: str               # precopy | stop-and-copy
    phases: dict[str, float]  # where the downtime went (MigrationProgress.phases) + resume_ms


def migrate_locally(vm, console_write: Callable[[bytes], None] = lambda data: None,
                    options: MigrationOptions | None = None) -> tuple[Any, MigrationFigures]:
    """Migrate running `vm` to a new VM in this process (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="pyvmm-migrate-") as directory:
        address = f"unix:{os.path.join(directory, 'migration.sock')}"
        listener = IncomingListener(address)
        received: dict[str, Any] = {}

        def destination() -> None:
            try:
                incoming = listener.receive(console_write, accept_timeout=60)
                committed = time.monotonic()
                incoming.vm.resume()
                received["resumed_at"] = time.monotonic()
                received["resume_ms"] = round((received["resumed_at"] - committed) * 1000, 2)
                received["vm"] = incoming.vm
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                received["error"] = exc

        thread = threading.Thread(target=destination, name="migration-destination", daemon=True)
        thread.start()
        started = time.monotonic()
        migration = Migration(vm, address, options)
        try:
            progress = migration.run()
        finally:
            thread.join(120)
            listener.close()
    if "error" in received:
        raise received["error"]
    if "vm" not in received:
        raise MigrationError("the local destination did not finish")
    assert migration.paused_at is not None  # a completed migration paused the source
    return received["vm"], MigrationFigures(
        total_s=received["resumed_at"] - started, downtime_ms=(received["resumed_at"] - migration.paused_at) * 1000,
        rounds=progress.round, bytes_sent=progress.bytes_sent, pages_sent=progress.pages_sent,
        zero_pages=progress.zero_pages, mode=progress.mode, phases={**progress.phases, "resume_ms": received["resume_ms"]})
