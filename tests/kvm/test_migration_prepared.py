"""The destination builds the VM when HELLO names the machine, while the source's guest runs,
so the pause covers only the last pages and loading the state: what it builds then, what it
leaves alone (the disk images the source still holds), what happens when the machine changes
after HELLO, and the figures that say where the downtime went."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import DiskConfig, MachineConfig, VsockConfig
from pyvmm.guests import build_source
from pyvmm.migration import IncomingListener, MigrationError, migrate
from pyvmm.migration.channel import HELLO, READY, Channel, connect, parse_address
from pyvmm.migration.machine import hello
from pyvmm.vm_state import MachineDescription

from test_migration import COUNT, LIMIT, Destination, finish_cleanly, wait_count_above

DOWNTIME_PHASES = ("pause_ms", "dirty_sync_ms", "final_pages_ms", "save_ms", "disks_ms", "state_ms",
                   "ack_ms", "commit_ms")


def counting_config(**changes) -> MachineConfig:
    return MachineConfig(kernel=str(build_source(KVM_GUESTS / "roundtrip.S", 64)), memory=16 << 20, **changes)


def started(config: MachineConfig, accel: str):
    vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    vm.memory.write_u64(LIMIT, 1 << 62)
    vm.start()
    wait_count_above(vm, 500)
    return vm


def test_the_vm_is_built_before_memory_moves_and_released_when_the_source_goes(tmp_path):
    """A source that says HELLO and hangs up after READY: by READY the destination's VM exists
    (its vsock socket listens); after the cut nothing of it is left and the error is one line."""
    import socket

    config = counting_config(vsock=VsockConfig(cid=7, uds=str(tmp_path / "dst.vsock")))
    # the machine HELLO names listens at dst.vsock; the VM it comes from at its own socket
    vm = build_vm(counting_config(vsock=VsockConfig(cid=7, uds=str(tmp_path / "src.vsock"))), lambda data: None,
                  accel=choose_accelerator("tcg").create())
    destination = Destination(f"unix:{tmp_path / 'dst.sock'}")
    try:
        channel = Channel(connect(parse_address(f"unix:{tmp_path / 'dst.sock'}"), 10), "test")
        channel.send_preamble()
        channel.send_json(HELLO, hello(MachineDescription.from_config(config), "tcg", vm.memory,
                                       vm.device_manager.tree.save()))
        channel.receive_preamble()
        channel.expect_json(READY)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(tmp_path / "dst.vsock"))          # the destination's VM listens already
        probe.close()
        channel.close()
        destination.join()
    finally:
        vm.close()
    assert destination.incoming is None
    assert isinstance(destination.error, MigrationError) and "\n" not in str(destination.error)
    assert "ended" in str(destination.error)
    assert not (tmp_path / "dst.vsock").exists()


def _locked(path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_disk_the_source_holds_is_locked_by_the_destination_only_at_the_handover(accel, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    source = started(counting_config(disks=(DiskConfig(path=str(image)),)), accel)
    destination = Destination(f"unix:{tmp_path / 'dst.sock'}")
    try:
        assert _locked(image)
        progress = migrate(source, f"unix:{tmp_path / 'dst.sock'}")
        left_at = source.memory.read_u64(COUNT)
    finally:
        source.close()
    incoming = destination.join()
    assert incoming is not None, destination.error
    vm = incoming.vm
    try:
        assert _locked(image)                    # by the destination's VM now (the source closed)
        vm.resume()
        finish_cleanly(vm, left_at)
    finally:
        vm.close()
    assert not _locked(image)
    assert progress.status == "completed"


def test_the_figures_say_where_the_downtime_went(accel, tmp_path):
    source = started(counting_config(), accel)
    destination = Destination(f"unix:{tmp_path / 'dst.sock'}")
    try:
        progress = migrate(source, f"unix:{tmp_path / 'dst.sock'}")
    finally:
        source.close()
    incoming = destination.join()
    incoming.vm.close()
    phases = progress.phases
    assert [name for name in phases if not name.startswith("destination_")] == ["prepare_ms", *DOWNTIME_PHASES]
    assert {"destination_decode_ms", "destination_load_ms", "destination_prepare_ms"} <= set(phases)
    assert incoming.phases.keys() == {"prepare_ms", "decode_ms", "load_ms"}
    # the phases follow each other: together they are the downtime (to rounding)
    assert sum(phases[name] for name in DOWNTIME_PHASES) == pytest.approx(progress.downtime_ms, abs=0.5)
    assert "destination:" in progress.downtime_line() and "pause" in progress.downtime_line()


def test_a_device_tree_changed_after_hello_gets_the_vm_rebuilt(monkeypatch, tmp_path):
    """The tree in HELLO is not the one in the state (as after a hot-plug during the
    migration): the destination builds the VM again from the state, and the guest counts on
    with its devices where the source had them."""
    import dataclasses

    import pyvmm.migration.source as source_module

    config = counting_config(rng="pci", console="virtio", console_transport="pci")
    source = started(config, "tcg")
    real_tree = source.device_manager.tree.save()

    def swapped_hello(machine, accelerator, memory, tree):
        nodes = {node.id: node for node in tree.nodes}
        rng, console = nodes["virtio-rng"], nodes["virtio-console"]
        nodes["virtio-rng"] = dataclasses.replace(rng, resources=console.resources)
        nodes["virtio-console"] = dataclasses.replace(console, resources=rng.resources)
        return hello(machine, accelerator, memory, dataclasses.replace(tree, nodes=tuple(nodes.values())))

    monkeypatch.setattr(source_module, "hello", swapped_hello)
    destination = Destination(f"unix:{tmp_path / 'dst.sock'}")
    try:
        migrate(source, f"unix:{tmp_path / 'dst.sock'}")
        left_at = source.memory.read_u64(COUNT)
    finally:
        source.close()
    incoming = destination.join()
    assert incoming is not None, destination.error
    try:
        assert incoming.vm.device_manager.tree.save() == real_tree
        incoming.vm.resume()
        finish_cleanly(incoming.vm, left_at)
    finally:
        incoming.vm.close()


def _speak_until_ready(tmp_path, vm) -> Channel:
    channel = Channel(connect(parse_address(f"unix:{tmp_path / 'dst.sock'}"), 10), "test")
    channel.send_preamble()
    channel.send_json(HELLO, hello(MachineDescription.from_config(vm.machine), vm.accel.name, vm.memory,
                                   vm.device_manager.tree.save()))
    channel.receive_preamble()
    channel.expect_json(READY)
    return channel


@pytest.mark.parametrize("codec", ["state file", "plain JSON"])
def test_the_state_travels_in_the_snapshot_state_file_format(codec, tmp_path):
    """STATE carries a state file's bytes (the snapshot codec, checksummed and versioned):
    the destination takes those, and refuses the bare JSON of a VmState in one line."""
    import json

    from pyvmm.migration.channel import ACK, END, STATE
    from pyvmm.snapshot.state_file import encode_state

    vm = build_vm(counting_config(), lambda data: None, accel=choose_accelerator("tcg").create())
    destination = Destination(f"unix:{tmp_path / 'dst.sock'}")
    try:
        vm.pause()
        state = vm.save()
        channel = _speak_until_ready(tmp_path, vm)
        payload = encode_state(state) if codec == "state file" else json.dumps(state.to_dict()).encode()
        channel.send(STATE, payload)
        channel.send_json(END, {})
        if codec == "state file":
            channel.expect(ACK)
        else:
            with pytest.raises(MigrationError, match="not a pyvmm state file"):
                channel.expect(ACK)
        channel.close()
        destination.join()
    finally:
        vm.close()
    if codec == "state file":     # no COMMIT came: the destination gave the VM up
        assert "ended" in str(destination.error)
    else:
        assert "not a pyvmm state file" in str(destination.error) and "\n" not in str(destination.error)
