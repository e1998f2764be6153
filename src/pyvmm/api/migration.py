"""A managed VM's live migrations, both ways, for VmInstance.

Outgoing: PUT /pyvmm/migration starts one in a thread (204 at once); GET /pyvmm/migration
shows its progress (pyvmm.migration.MigrationProgress); PUT /pyvmm/migration/cancel stops
it and the VM runs on. On success the VM stops with outcome "migrated" and this process
ends (its record keeps the final figures). While one is under way, pause, resume and reboot
are refused (the migration pauses the VM itself at the end) and a stop cancels it first.

Incoming: a VM process started with --incoming ADDRESS listens there before it says it is
ready, then waits; the VM that arrives is this instance's VM from then on (resumed, its
console on this process's console), checked against and given the host-side resources of
this VM's own definition. A migration that fails ends the instance with outcome "failed"
and its one-line reason: no VM is left half-made.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import UserError, user_error_message

from .states import INCOMING, NOT_STARTED, RUNNING, STOPPED, InvalidState

if TYPE_CHECKING:
    from .instance import VmInstance

log = logging.getLogger(__name__)

UNDER_WAY = ("setup", "precopy", "stop-and-copy", "completing")


def under_way(instance: "VmInstance") -> bool:
    migration = instance.migration
    return migration is not None and migration.progress().status in UNDER_WAY


def start(instance: "VmInstance", options: dict[str, Any]) -> None:
    from ..errors import ConfigError
    from ..migration import Migration, MigrationError, MigrationOptions, parse_address

    try:
        address = parse_address(options["destination"])
    except MigrationError as exc:
        raise ConfigError(str(exc).split(": ", 1)[-1], "destination") from None
    settings = MigrationOptions(downtime_ms=options.get("downtime_ms", 300), bandwidth=options.get("bandwidth"),
                                timeout=options.get("timeout"), max_rounds=options.get("max_rounds", 30))
    with instance.lock:
        vm = instance._require_vm()
        if under_way(instance):
            raise InvalidState("a migration is under way already (GET /pyvmm/migration; cancel it first)")
        migration = Migration(vm, address, settings)
        instance.migration = migration
    threading.Thread(target=_run, args=(migration,), name="migration", daemon=True).start()


def _run(migration) -> None:
    from ..migration import MigrationError

    try:
        progress = migration.run()
        log.info("migration: %s", progress.line())
    except MigrationError as exc:
        log.warning("migration failed: %s", exc)
    except Exception:  # noqa: BLE001 - a pyvmm bug: the VM was given back; the log has the traceback
        log.exception("migration failed")


def progress(instance: "VmInstance") -> dict[str, Any]:

    migration = instance.migration
    if migration is None:
        raise InvalidState("no migration has been started on this VM")
    return migration.progress().to_dict()


def cancel(instance: "VmInstance") -> None:

    migration = instance.migration
    if migration is None or not under_way(instance):
        raise InvalidState("no migration is under way")
    migration.cancel()


def listen(instance: "VmInstance", address: str) -> None:
    """Bind `address` and wait for the VM in a thread (see the module docstring)."""
    from ..accel.select import choose_accelerator
    from ..migration import IncomingListener
    from ..runner import with_default_guest

    with instance.lock:
        if instance.state != NOT_STARTED:
            raise InvalidState("only a VM that has not been started can wait for a migration")
        machine, options = instance.spec.machine_config()
        machine, options = with_default_guest(machine, options, None)
        listener = IncomingListener(address)
        instance.state = INCOMING
        instance.incoming_address = str(listener.bound_address)
    threading.Thread(target=_receive, args=(instance, listener, machine, choose_accelerator),
                     name="migration-incoming", daemon=True).start()


def _receive(instance: "VmInstance", listener, machine, choose_accelerator) -> None:
    from ..vm import EXIT_USAGE, VmOutcome

    try:
        try:
            incoming = listener.receive(instance.console.write, config=machine)
        finally:
            listener.close()
        vm: Any = incoming.vm
        with instance.lock:
            instance.console.attach_port(vm.devices["virtio-console" if machine.console == "virtio" else "com1"])
            instance._built = (machine, choose_accelerator(vm.accel.name), None)
            vm.resume()
            instance.vm, instance.state = vm, RUNNING
            instance.boots += 1
            instance.started_at = time.time()
        log.info("migration: received from %s in %.2f s (%d pages)", incoming.source, incoming.seconds,
                 incoming.pages)
        instance.watch()
    except Exception as exc:  # noqa: BLE001 - whatever stops the migration is the outcome, in one line
        message = user_error_message(exc) if isinstance(exc, (UserError, OSError)) else \
            f"internal error: {type(exc).__name__}: {exc}"
        log.debug("incoming migration failed", exc_info=True)
        with instance.lock:
            instance.outcome = VmOutcome("failed", EXIT_USAGE, message)
            instance.state = STOPPED
        instance.end(instance.outcome)
