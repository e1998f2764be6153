"""A default guest running in this process with its agent answering: restored from the warm
snapshot (with its own identity), or booted. What `pyvmm.Sandbox` and `pyvmm run -- CMD`
stand on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Callable

from ..errors import UserError

log = logging.getLogger(__name__)

AGENT_TIMEOUT = 60.0     # a restored guest's agent answers at once; a booted one within the boot


class GuestStartError(UserError):
    """The guest could not be started (one line)."""


def runtime_dir() -> str:
    """A private directory for one guest's sockets ($XDG_RUNTIME_DIR when set, else /tmp)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return tempfile.mkdtemp(prefix="pyvmm-guest-", dir=base if os.path.isdir(base) else None)


class RunningGuest:
    """A started default guest: `vm` runs, `client` talks to its agent. close() stops the VM
    and removes its sockets (idempotent)."""

    def __init__(self, vm, directory: str, uds: str, started_from: str) -> None:
        from ..agent import AgentClient

        self.vm = vm
        self.directory = directory
        self.uds = uds
        self.started_from = started_from      # "snapshot" or "boot"
        self.client = AgentClient(uds, connect_timeout=AGENT_TIMEOUT)

    def close(self) -> None:
        vm, self.vm = self.vm, None
        if vm is not None:
            vm.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def closed(self) -> bool:
        return self.vm is None


def start_guest(*, warm: bool = True, accel: str = "auto", console_write: Callable[[bytes], None] | None = None,
                progress: Callable[[str], None] | None = None, set_identity: bool = True) -> RunningGuest:
    """The default guest, running, its agent answering. `warm`: restored from the warm snapshot
    (made first if needed) with a fresh identity; else booted. `console_write`: where its
    serial console goes (default: nowhere). `set_identity=False`: the caller sends the agent's
    part of the identity itself, with its first request (AgentClient.exec_stream(identity=)),
    before anything else runs in the guest."""
    from ..accel.select import choose_accelerator

    choice = choose_accelerator(accel)
    write = console_write or _discard
    directory = runtime_dir()
    uds = os.path.join(directory, "vsock")
    try:
        if warm:
            return _restore(choice, directory, uds, write, progress, set_identity)
        return _boot(choice, directory, uds, write)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _restore(choice, directory: str, uds: str, write, progress, set_identity: bool) -> RunningGuest:
    from ..agent import new_machine_id
    from ..identity import refresh_identity
    from ..persist import StateError
    from ..snapshot import SnapshotError
    from .warm import warm_snapshot

    snapshot = warm_snapshot(choice, progress=progress)
    try:
        vm = _load(snapshot, write, choice, uds)
    except (StateError, SnapshotError, OSError) as exc:   # never used broken: made again
        snapshot = warm_snapshot(choice, progress=progress, rebuild_reason=f"cannot be loaded ({exc})")
        vm = _load(snapshot, write, choice, uds)
    guest = RunningGuest(vm, directory, uds, "snapshot")
    try:
        refresh_identity(vm)
        vm.resume()
        if set_identity:
            guest.client.set_identity(new_machine_id())
    except BaseException:
        guest.close()
        raise
    return guest


def _load(snapshot, write, choice, uds: str):
    from ..snapshot import RESTORE_MODES, SnapshotError, load_snapshot
    from .warm import with_vsock_socket

    prepare = with_vsock_socket(uds)
    accel = choice.create()
    try:
        if "cow" in RESTORE_MODES:
            try:     # instant: pages come from the file on first touch
                return load_snapshot(snapshot.state_path, snapshot.memory_path, write, mode="cow", accel=accel,
                                     prepare=prepare)
            except SnapshotError as exc:   # refused before anything was built: `accel` is unused
                if "not available" not in str(exc):
                    raise
                log.debug("restore mode cow: %s; copying instead", exc)
        return load_snapshot(snapshot.state_path, snapshot.memory_path, write, mode="copy", accel=accel,
                             prepare=prepare)
    except BaseException:
        accel.close()      # idempotent: a failed restore may have closed it already
        raise


def _boot(choice, directory: str, uds: str, write) -> RunningGuest:
    from ..builder import build_vm
    from ..config import MachineConfig, RunOptions, VsockConfig
    from ..images.kernel_warnings import CONSOLE_LOGLEVEL
    from ..runner import with_default_guest
    from .warm import BOOT_TIMEOUT, WARM_CID, WARM_COMMAND, WARM_CPUS, WARM_MEMORY

    machine = MachineConfig(memory=WARM_MEMORY, cpus=WARM_CPUS, vsock=VsockConfig(cid=WARM_CID, uds=uds),
                            cmdline=CONSOLE_LOGLEVEL)
    machine, _ = with_default_guest(machine, RunOptions(), WARM_COMMAND)
    vm = build_vm(machine, write, accel=choice.create())
    guest = RunningGuest(vm, directory, uds, "boot")
    try:
        vm.start()
        guest.client.connect_timeout = BOOT_TIMEOUT     # the first answer comes at the end of the boot
        guest.client.exec(["true"])
        guest.client.connect_timeout = AGENT_TIMEOUT
    except BaseException:
        guest.close()
        raise
    return guest


def _discard(data: bytes) -> None:
    pass
