"""VmInstance: every operation on the VM of this process, behind every front end.

The HTTP server (server.py) maps requests to these methods; the CLI and the Python client
reach them through that server. Methods take checked Python values, return JSON-able data
and raise UserError subclasses for what the caller got wrong (the server answers 400).

Concurrency: one lock serialises every operation that reads or changes the configuration or
the VM's state (configuring, start, pause, resume, stop, reboot, power button). A second
request waits for the first to finish, so a pause requested during a start applies to the
started VM, and the answer to GET / never shows a half-made change. Read-only views that
need no consistency with the configuration (console history, stats) do not take it, nor do
the guest agent's requests (agent.py), which take it only to find the vsock socket: a command
may run for minutes while other requests are served.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .. import __version__
from ..errors import ConfigError, PyvmmError, UserError
from .console import ConsoleHub
from . import hotplug, migration as migrations
from .states import INCOMING, NOT_STARTED, PAUSED, RUNNING, STOPPED, InvalidState
from .schema import (ACTION, BOOT_SOURCE, ENTROPY, MACHINE_CONFIG, METRICS, MIGRATION, PYVMM_ACTION,
                     VM_STATE, VSOCK, VmSpec, check_body, check_drive, check_interface, check_logger)

if TYPE_CHECKING:
    from ..vm import Vm, VmOutcome

log = logging.getLogger(__name__)

AFTER_START = "The requested operation is not supported after starting the microVM."


class NotSupported(UserError):
    """pyvmm has no way to do this (yet)."""


class VmInstance:
    def __init__(self, instance_id: str = "anonymous-instance", spec: VmSpec | None = None, *,
                 console: ConsoleHub | None = None) -> None:
        self.id = instance_id
        self.spec = spec if spec is not None else VmSpec()
        self.console = console if console is not None else ConsoleHub()
        self.lock = threading.RLock()
        self.state = NOT_STARTED
        self.vm: Vm | None = None
        self.outcome: VmOutcome | None = None
        self.started_at: float | None = None
        self.boots = 0
        self.ended = threading.Event()
        self._on_end: list[Callable[[Any], None]] = []
        self._reboot_wanted = False
        self._stopping = False
        self.on_reboot = "restart"
        self._built: tuple[Any, Any, Any] | None = None
        self._track_dirty_pages = False  # machine-config's track_dirty_pages, as started
        # Changes the configuration gets at InstanceStart (the Firecracker launcher's defaults)
        self.adapt_spec: Callable[[VmSpec], VmSpec] | None = None
        self.migration: Any = None              # the last outgoing migration.Migration
        self.incoming_address: str | None = None  # where a VM started with --incoming waits

    # --- Firecracker's resources ------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        # Firecracker's enum has no "stopped", nor a VM waiting for a migration
        state = self.state if self.state not in (STOPPED, INCOMING) else NOT_STARTED
        return {"id": self.id, "state": state, "vmm_version": __version__, "app_name": "pyvmm"}

    def version(self) -> dict[str, Any]:
        return {"firecracker_version": __version__}

    def machine_config(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.spec.machine)

    def vm_config(self) -> dict[str, Any]:
        with self.lock:
            return self.spec.to_document()

    def put_machine_config(self, body: Any, *, partial: bool = False) -> None:
        checked = check_body(body, MACHINE_CONFIG, partial=partial)

        def change(spec: VmSpec) -> None:
            if partial:
                spec.machine.update(checked)
            else:
                spec.machine = {**_defaults(), **checked}
            if spec.machine.get("huge_pages", "None") != "None" or spec.machine.get("ksm"):
                _check_backing(spec)  # what the host cannot give is refused now (a 400), not at start

        self._configure(change)

    def put_boot_source(self, body: Any) -> None:
        checked = check_body(body, BOOT_SOURCE)
        for name in ("kernel_image_path", "initrd_path"):
            _check_file(checked.get(name), name)
        self._configure(lambda spec: setattr(spec, "boot_source", checked))

    def put_drive(self, drive_id: str, body: Any) -> None:
        checked = check_drive(body, drive_id)
        _check_file(checked.get("path_on_host"), "path_on_host")
        if self.state in (RUNNING, PAUSED):
            return hotplug.put_drive(self, drive_id, checked)
        self._configure(lambda spec: spec.put_drive(checked))

    def patch_drive(self, drive_id: str, body: Any) -> None:
        """Its rate limiter (at once on a running VM) or, before boot, its path (api/rate_limits.py)."""
        from .rate_limits import patch_drive

        patch_drive(self, drive_id, body)

    def patch_interface(self, iface_id: str, body: Any) -> None:
        """Its rate limiters, before boot or at once on a running VM (api/rate_limits.py)."""
        from .rate_limits import patch_interface

        patch_interface(self, iface_id, body)

    def put_interface(self, iface_id: str, body: Any) -> None:
        checked = check_interface(body, iface_id)
        if self.state in (RUNNING, PAUSED):
            return hotplug.put_interface(self, iface_id, checked)
        self._configure(lambda spec: spec.interfaces.__setitem__(iface_id, checked))

    def put_vsock(self, body: Any) -> None:
        checked = check_body(body, VSOCK)
        if self.state in (RUNNING, PAUSED):
            return hotplug.put_vsock(self, checked)
        self._configure(lambda spec: setattr(spec, "vsock", checked))

    def put_entropy(self, body: Any) -> None:
        checked = check_body(body, ENTROPY)
        if self.state in (RUNNING, PAUSED):
            return hotplug.put_entropy(self, checked)
        self._configure(lambda spec: setattr(spec, "entropy", checked))

    def put_logger(self, body: Any) -> None:
        checked = check_logger(body)
        with self.lock:
            if "log_path" in checked:
                _add_log_file(checked)
            self.spec.logger = checked

    def put_metrics(self, body: Any) -> None:
        checked = check_body(body, METRICS)
        with self.lock:
            try:
                with open(checked["metrics_path"], "a"):
                    pass
            except OSError as exc:
                raise ConfigError(f"cannot open {checked['metrics_path']}: {exc.strerror}", "metrics_path") from None
            self.spec.metrics = checked

    def action(self, body: Any) -> None:
        kind = check_body(body, ACTION)["action_type"]
        if kind == "InstanceStart":
            self.start()
        elif kind == "SendCtrlAltDel":
            self.press_power_button()  # Firecracker's guests power off on it; pyvmm's power button does that
        else:
            self.flush_metrics()

    def create_snapshot(self, body: Any) -> None:
        """PUT /snapshot/create (api/snapshot.py)."""
        from .snapshot import create

        create(self, body)

    def load_snapshot(self, body: Any) -> None:
        """PUT /snapshot/load (api/snapshot.py)."""
        from .snapshot import load

        load(self, body)

    def set_vm_state(self, body: Any) -> None:
        if check_body(body, VM_STATE)["state"] == "Paused":
            self.pause()
        else:
            self.resume()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Build the VM from the configuration and start it (InstanceStart)."""
        with self.lock:
            if self.state != NOT_STARTED:
                raise InvalidState(AFTER_START if self.state != STOPPED else "the VM has stopped")
            from ..accel.select import choose_accelerator
            from ..runner import with_default_guest

            spec = self.spec if self.adapt_spec is None else self.adapt_spec(self.spec)
            machine, options = spec.machine_config()
            self.on_reboot = spec.pyvmm.get("on_reboot", "restart")
            self._track_dirty_pages = bool(spec.machine.get("track_dirty_pages"))
            choice = choose_accelerator(options.accel)
            machine, options = with_default_guest(machine, options, None)
            symbols = None
            if options.system_map is not None:
                from ..loader.linux.symbols import LazySymbolTable

                symbols = LazySymbolTable(options.system_map)
            self._built = (machine, choice, symbols)
            self._boot()
            self.started_at = time.time()
            self.watch()

    def watch(self) -> None:
        """Follow the VM that now runs until it ends for good (a thread)."""
        threading.Thread(target=self._watch, name="vm-watch", daemon=True).start()

    def _boot(self) -> None:
        from ..builder import build_vm

        assert self._built is not None, "start() sets what _boot() builds"
        machine, choice, symbols = self._built
        vm = build_vm(machine, self.console.write, accel=choice.create())
        vm.symbols = symbols
        if self._track_dirty_pages:
            from ..memory.dirty import SNAPSHOT_READER

            try:  # from the first instruction: a Diff snapshot holds the pages written since then
                vm.start_dirty_log(SNAPSHOT_READER)
            except BaseException:
                vm.close()
                raise
        self.console.attach_port(vm.devices["virtio-console" if machine.console == "virtio" else "com1"])
        vm.start()
        self.vm, self.state = vm, RUNNING
        self.boots += 1

    def _watch(self) -> None:
        """Wait for each VM to end: reboot it if asked (or if the guest reset it and on_reboot
        says restart), else record the outcome."""
        from ..vm import EXIT_VMM_ERROR, VmOutcome

        while True:
            vm = self.vm
            assert vm is not None
            outcome = vm.wait()
            assert outcome is not None  # wait() without a timeout returns once the VM stopped
            with self.lock:  # stop() and reboot() wake a paused VM after stopping it: let them finish
                pass
            vm.close()
            with self.lock:
                restart = self._reboot_wanted or (outcome.reason == "reset" and not self._stopping and
                                                  self.on_reboot == "restart")
                self._reboot_wanted = False
                if restart:
                    try:
                        self._boot()
                        continue
                    except Exception as exc:  # noqa: BLE001 - the reboot's failure is the outcome
                        outcome = VmOutcome("vmm-error", EXIT_VMM_ERROR, f"reboot failed: {exc}")
                self.outcome, self.state, self.vm = outcome, STOPPED, None
            break
        self.end(outcome)

    def end(self, outcome) -> None:
        """The instance has ended for good: wake whoever waits."""
        self.ended.set()
        for callback in self._on_end:
            callback(outcome)

    def on_end(self, callback: Callable[[Any], None]) -> None:
        """Call `callback(outcome)` once the VM has stopped for good (no reboot follows)."""
        self._on_end.append(callback)

    def pause(self) -> None:
        with self.lock:
            vm = self._require_vm()
            self._refuse_during_migration("pause")
            vm.pause()
            self.state = PAUSED

    def resume(self) -> None:
        with self.lock:
            vm = self._require_vm()
            self._refuse_during_migration("resume")
            vm.resume()
            self.state = RUNNING

    def stop(self, message: str = "destroyed by the user", wait: float | None = 30.0) -> None:
        """End the VM at once (virsh destroy), paused or not, and wait until it has."""
        from ..vm import EXIT_OK, VmOutcome

        with self.lock:
            vm = self._require_vm()
            if migrations.under_way(self):
                self.migration.cancel()
            self._stopping = True
            self._reboot_wanted = False  # a stop after a reboot request wins: no new boot follows
            # A stop wakes run loops parked at their pause point by itself; resuming would run
            # the I/O thread's pending work and thaw guest time on a VM asked to end paused.
            vm.request_stop(VmOutcome("destroyed", EXIT_OK, message))
        self.ended.wait(wait)

    def reboot(self) -> None:
        """Stop the VM and boot the same machine again (a cold reboot: fresh memory)."""
        from ..vm import EXIT_OK, VmOutcome

        with self.lock:
            vm = self._require_vm()
            self._refuse_during_migration("reboot")
            if self._stopping:
                raise InvalidState("the VM is being stopped")
            self._reboot_wanted = True
            vm.request_stop(VmOutcome("reset", EXIT_OK, "rebooted by the user"))   # wakes paused run loops

    def press_power_button(self) -> None:
        """The ACPI power button: a guest that handles it powers off (graceful shutdown)."""
        with self.lock:
            vm = self._require_vm()
            press = getattr(vm, "press_power_button", None)
            if press is None:
                raise NotSupported("graceful shutdown needs an ACPI power button, which this pyvmm build "
                                   "does not have yet: use destroy")
            try:
                press()
            except PyvmmError as exc:  # e.g. the guest stopped meanwhile
                raise InvalidState(str(exc)) from None

    def pyvmm_action(self, body: Any) -> None:
        kind = check_body(body, PYVMM_ACTION)["action_type"]
        {"Stop": self.stop, "Reboot": self.reboot, "Shutdown": self.press_power_button}[kind]()

    # --- live migration (api/migration.py) ------------------------------------------------

    def migrate(self, body: Any) -> None:
        migrations.start(self, check_body(body, MIGRATION))

    def migration_progress(self) -> dict[str, Any]:
        return migrations.progress(self)

    def cancel_migration(self) -> None:
        migrations.cancel(self)

    def listen_for_migration(self, address: str) -> None:
        migrations.listen(self, address)

    def _refuse_during_migration(self, what: str) -> None:
        if migrations.under_way(self):
            raise InvalidState(f"a migration is under way: cannot {what} now (cancel it first)")

    def _require_vm(self):
        if self.vm is None:
            raise InvalidState("the VM is not running" if self.state == STOPPED else "the VM has not been started")
        return self.vm

    def configure(self, change: Callable[[VmSpec], None]) -> None:
        self._configure(change)

    def _configure(self, change: Callable[[VmSpec], None]) -> None:
        """Apply `change` to a copy of the configuration; keep it if the machine it describes is valid."""
        with self.lock:
            if self.state != NOT_STARTED:
                raise InvalidState(AFTER_START)
            spec = self.spec.copy()
            change(spec)
            spec.machine_config()
            self.spec = spec

    # --- pyvmm's views ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        outcome = self.outcome
        return {"id": self.id, "state": self.state, "pid": os.getpid(), "boots": self.boots,
                "started_at": self.started_at, "incoming": self.incoming_address,
                "outcome": None if outcome is None else {"reason": outcome.reason, "status": outcome.status,
                                                         "message": outcome.message}}

    def devices(self) -> list[dict[str, Any]]:
        """The device tree: id, kind, transport, parent and resources of every device."""
        with self.lock:
            vm = self._require_vm()
            manager = getattr(vm, "device_manager", None)
            if manager is None:  # a Vm built without the device manager: names and model classes
                return [{"id": name, "kind": type(device).__name__} for name, device in vm.devices.items()]
            nodes = []
            for node in manager.tree:
                resources = node.resources.to_dict()["fields"]
                nodes.append({"id": node.id, "kind": node.kind, "transport": node.transport, "parent": node.parent,
                              "resources": resources})
            return nodes

    def stats(self) -> dict[str, Any]:
        """The process's CPU time and memory, and, while the VM runs, what api/stats.py gathers
        from it (vCPUs, exits, interrupts, devices, guest RAM); empty parts before it runs."""
        from .stats import collect

        vm = self.vm
        times, rss = os.times(), _rss_bytes()
        parts: dict[str, Any] = {"vcpus": [], "exits": {}, "exits_total": 0, "exits_source": None,
                                 "interrupts_injected": None, "vcpu_threads": [], "vcpu_time_s": 0.0, "devices": {},
                                 "memory": {"guest_ram_bytes": 0, "guest_ram_resident_bytes": 0,
                                            "process_rss_bytes": rss, "vmm_overhead_bytes": rss}}
        if vm is not None:
            try:
                parts = collect(vm, rss)
            except (OSError, ValueError):  # the VM closed under us (stopped meanwhile): no VM part
                pass
        return {"state": self.state, "uptime_s": None if self.started_at is None else time.time() - self.started_at,
                "vcpu_count": self.spec.machine["vcpu_count"], "cpu_user_s": times.user, "cpu_system_s": times.system,
                "rss_bytes": rss, "console_bytes": self.console.total_bytes, **parts}

    def flush_metrics(self) -> None:
        with self.lock:
            if self.spec.metrics is None:
                raise InvalidState("no metrics file: PUT /metrics first")
            path = self.spec.metrics["metrics_path"]
        with open(path, "a") as out:
            out.write(json.dumps({"utc_timestamp_ms": int(time.time() * 1000), **self.stats()}) + "\n")


def _check_file(path: str | None, field: str) -> None:
    """Like Firecracker, a host file is looked at when it is configured, not at start."""
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{path!r:.200}: no such file", field)


def _check_backing(spec: VmSpec) -> None:
    from ..memory.backing import check_host

    machine, _ = spec.machine_config()
    try:
        check_host(machine.backing(), machine.memory)
    except ConfigError as exc:
        raise ConfigError(exc.detail, f"machine-config.{exc.field}") from None


def _defaults() -> dict[str, Any]:
    from .schema import machine_defaults

    return machine_defaults()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _add_log_file(logger: dict[str, Any]) -> None:
    levels = {"Error": logging.ERROR, "Warning": logging.WARNING, "Info": logging.INFO, "Debug": logging.DEBUG,
              "Trace": logging.DEBUG, "Off": logging.CRITICAL + 10}
    try:
        handler = logging.FileHandler(logger["log_path"])
    except OSError as exc:
        raise ConfigError(f"cannot open {logger['log_path']}: {exc.strerror}", "log_path") from None
    parts = (["%(levelname)s"] if logger.get("show_level") else []) + \
            (["%(pathname)s:%(lineno)d"] if logger.get("show_log_origin") else [])
    handler.setFormatter(logging.Formatter(" ".join(["%(asctime)s", *parts, "%(message)s"])))
    root = logging.getLogger(logger.get("module") or "pyvmm")
    level = levels[logger.get("level", "Info")]
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, level))
