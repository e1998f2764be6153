"""The receiving side: wait for a migration, build the VM it carries, run it on COMMIT.

The destination reads HELLO (the machine and its device tree) and answers READY (or ERROR:
a machine it cannot continue is refused before any memory moves) once it has built that VM,
paused and not started, on fresh guest memory (restore.prepare_vm: disks opened by path but
not yet locked, TAPs by name, the vsock and console host sides made anew). PAGES frames go
straight into that memory while the source's guest runs. After STATE and END, all that is
left is loading the state into the prepared VM (restore.finish_restore, which takes the disk
locks the source released); then it answers ACK (with its phases' figures) and waits for COMMIT. Only with COMMIT is the VM its own: it returns it, paused, for the
caller to resume. A stream cut or corrupted at any point before that, a state that does not
restore, a source that gives up: everything received is released (no half VM) and a
MigrationError says why in one line.
"""

from __future__ import annotations

import logging
import socket
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import MachineConfig
from ..errors import UserError, user_error_message
from .channel import (ACK, COMMIT, END, HELLO, PAGES, READY, STATE, Address, Channel, MigrationError, StreamError,
                      accept, listen, parse_address)
from ..snapshot.state_file import decode_state
from .machine import merge_machine, read_hello
from .pages import PageReceiver

log = logging.getLogger(__name__)


@dataclass
class Incoming:
    """A migration received: the VM (paused until the caller resumes it) and figures."""
    vm: Any
    pages: int
    bytes_received: int
    seconds: float           # from the connection to COMMIT
    source: str
    phases: dict[str, float] = field(default_factory=dict)  # prepare_ms, decode_ms, load_ms


class IncomingListener:
    """A destination waiting at `address` (bound at construction, so the source can connect
    as soon as this exists)."""

    def __init__(self, address: str | Address) -> None:
        self.address = address if isinstance(address, Address) else parse_address(address)
        self._listener = listen(self.address)

    @property
    def bound_address(self) -> Address:
        """The address really bound (tcp: the port chosen for port 0)."""
        if self.address.kind == "tcp":
            host, port = self._listener.getsockname()[:2]
            return Address("tcp", host=host, port=port)
        return self.address

    def receive(self, console_write: Callable[[bytes], None], *, config: MachineConfig | None = None,
                accept_timeout: float | None = None) -> Incoming:
        """Wait for one migration and receive it (see the module docstring). `config`: this
        destination's own machine (its definition): the incoming one must match what the guest
        sees and takes its host-side resources from it."""
        conn = accept(self._listener, accept_timeout)
        try:
            peer = _peer_name(conn, self.address)
            return receive(Channel(conn, peer), console_write, config=config)
        finally:
            conn.close()

    def close(self) -> None:
        self._listener.close()
        if self.address.kind == "unix":
            try:
                import os

                os.unlink(self.address.path)
            except OSError:
                pass

    def __enter__(self) -> "IncomingListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def receive(channel: Channel, console_write: Callable[[bytes], None], *,
            config: MachineConfig | None = None) -> Incoming:
    """Receive one migration over a connected `channel` (see the module docstring)."""
    from ..accel.select import choose_accelerator
    from ..memory import GuestMemory
    from ..restore import prepare_vm
    from ..arch.x86_64 import layout

    started = time.monotonic()
    phases: dict[str, float] = {}
    memory = None
    vm = None
    try:
        channel.receive_preamble()
        channel.send_preamble()
        incoming, accelerator, device_tree = read_hello(channel.expect_json(HELLO))
        machine = merge_machine(incoming, config)
        clock = time.monotonic()
        try:
            accel = choose_accelerator(accelerator).create()
        except UserError as exc:
            raise MigrationError(f"the VM runs on {accelerator} at the source, which this host cannot: "
                                 f"{user_error_message(exc)}") from None
        try:
            memory = GuestMemory.from_specs(layout.memory_specs(machine.memory, machine.virtio_mem_size),
                                            machine.to_config().backing())
        except BaseException:
            accel.close()
            raise
        # Built now, while the source still runs the guest: the pause then costs only the
        # last pages and loading the state (the disk images are locked when it is loaded).
        vm = prepare_vm(machine.to_config(), device_tree, memory, console_write, accel, lock_disks=False)
        phases["prepare_ms"] = _ms_since(clock)
        channel.send_json(READY, {})
        pages = PageReceiver(memory)
        state_bytes = None
        while True:
            kind, flags, payload = channel.receive()
            if kind == PAGES and state_bytes is None:
                pages.apply(payload, flags)
            elif kind == STATE and state_bytes is None:
                state_bytes = payload
            elif kind == END and state_bytes is not None:
                break
            else:
                raise StreamError(f"the migration stream from {channel.peer} is out of order "
                                  f"(an unexpected frame of kind {kind})")
        clock = time.monotonic()
        state = decode_state(state_bytes, f"the migration from {channel.peer}")
        if state.machine != incoming or state.accelerator != accelerator:
            raise MigrationError("the VM state sent does not describe the machine announced in HELLO")
        phases["decode_ms"] = _ms_since(clock)
        clock = time.monotonic()
        vm = _load_state(vm, dataclasses.replace(state, machine=machine), console_write)
        memory = None  # the VM owns it
        _reset_vsock_connections(vm)
        phases["load_ms"] = _ms_since(clock)
        channel.send_json(ACK, phases)
        channel.expect(COMMIT)
    except BaseException as exc:
        message = user_error_message(exc) if isinstance(exc, (UserError, OSError)) else f"{type(exc).__name__}: {exc}"
        channel.send_error(f"the destination gave up: {message}")   # if the source still listens
        if vm is not None:
            if memory is not None:
                vm.release_memory()
            vm.close()
        if memory is not None:
            memory.close()
        if isinstance(exc, MigrationError):
            raise
        if isinstance(exc, (UserError, OSError)):
            raise MigrationError(f"the incoming migration failed: {message}") from None
        raise
    return Incoming(vm, pages.pages, channel.bytes_received, time.monotonic() - started, channel.peer, phases)


def _load_state(vm, state, console_write: Callable[[bytes], None]):
    """`state` loaded into the prepared `vm` (started, paused). A source whose device tree
    changed after HELLO (a device hot-plugged meanwhile) gets a VM rebuilt from its state on
    the same memory instead."""
    from ..accel.select import choose_accelerator
    from ..restore import finish_restore, restore_vm, same_tree

    if same_tree(state.device_tree, vm.device_manager.tree.save()):
        finish_restore(vm, state)
        return vm
    log.info("migration: the device tree changed since HELLO: the VM is rebuilt from the state")
    memory = vm.release_memory()     # on a failure the caller closes it
    vm.close()
    return restore_vm(state, memory, console_write, accel=choose_accelerator(state.accelerator).create())


def _ms_since(clock: float) -> float:
    return round((time.monotonic() - clock) * 1000, 2)


def _reset_vsock_connections(vm) -> None:
    """The guest's vsock connections had their host ends in the source's process: they cannot
    go on. As QEMU does after a migration, the guest gets a TRANSPORT_RESET (its connected
    sockets reset, its listeners stay), with the CID it had."""
    from ..restore import VSOCK_ID

    if vm.machine.vsock is not None:
        device = vm.device_manager.device(VSOCK_ID)
        device.change_guest_cid(device.guest_cid)


def _peer_name(conn: socket.socket, address: Address) -> str:
    if address.kind == "tcp":
        try:
            host, port = conn.getpeername()[:2]
            return f"tcp:{host}:{port}"
        except OSError:
            pass
    return "the source"
