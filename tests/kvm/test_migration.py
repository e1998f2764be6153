"""Live migration of tiny guests on both accelerators, source and destination in this process
over a Unix socket: guests/roundtrip.S counts in memory and in a register and through the
UART's scratch register, checking all three at every step, so a page, a register or a device
state lost on the way makes it fail its own check (debug exit 2) or restart (STARTS 2)."""

from __future__ import annotations

import threading
import time

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.accel.select import choose_accelerator
from pyvmm.builder import build_vm
from pyvmm.config import MachineConfig
from pyvmm.guests import build_source
from pyvmm.migration import IncomingListener, MigrationError, MigrationOptions, migrate

COUNT, LIMIT, STARTS = 0x300000, 0x300008, 0x300010
OK_STATUS = 1  # debug exit 0


def counting_vm(accel: str, memory: int = 16 << 20):
    config = MachineConfig(kernel=str(build_source(KVM_GUESTS / "roundtrip.S", 64)), memory=memory)
    vm = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    vm.memory.write_u64(LIMIT, 1 << 62)
    vm.start()
    wait_count_above(vm, 500)
    return vm


def wait_count_above(vm, count: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (now := vm.memory.read_u64(COUNT)) <= count and not vm.stopped:
        assert time.monotonic() < deadline, f"the guest's count stayed at {now}"
        time.sleep(0.001)
    assert not vm.stopped, vm.outcome
    return now


class Destination:
    """A destination receiving in a thread: .incoming once it has the VM, .error if it failed."""

    def __init__(self, address: str) -> None:
        self.listener = IncomingListener(address)
        self.incoming = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.incoming = self.listener.receive(lambda data: None, accept_timeout=60)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc
        finally:
            self.listener.close()

    def join(self):
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.incoming


def finish_cleanly(vm, after: int) -> None:
    """The migrated guest counts on from `after`, never restarted, and ends with its own
    checks passed."""
    now = wait_count_above(vm, after)
    assert vm.memory.read_u64(STARTS) == 1
    vm.memory.write_u64(LIMIT, now + 2000)
    outcome = vm.wait(60)
    assert outcome is not None and (outcome.reason, outcome.status) == ("debug-exit", OK_STATUS), outcome


def test_a_running_guest_migrates_and_counts_on(accel, tmp_path):
    address = f"unix:{tmp_path / 'migrate.sock'}"
    destination = Destination(address)
    source = counting_vm(accel)
    try:
        progress = migrate(source, address, MigrationOptions())
        assert source.stopped and source.outcome.reason == "migrated"
        left_at = source.memory.read_u64(COUNT)
        left_ram = [source.memory.read(r.guest_base, r.size) for r in source.memory.regions]
    finally:
        source.close()
    incoming = destination.join()
    assert destination.error is None, destination.error
    vm = incoming.vm
    try:
        assert vm.paused and vm.memory.read_u64(COUNT) == left_at
        assert [vm.memory.read(r.guest_base, r.size) for r in vm.memory.regions] == left_ram   # every page
        vm.resume()
        finish_cleanly(vm, left_at)
    finally:
        vm.close()
    assert progress.status == "completed" and progress.downtime_ms is not None
    assert progress.pages_sent + progress.zero_pages >= (16 << 20) // 4096   # every page went, once at least
    assert progress.pages_sent < (16 << 20) // 4096 // 2                      # ... zero ones as markers


def test_a_destination_that_cannot_take_the_machine_refuses_before_memory_moves(tmp_path):
    """The destination's own definition says 32 MiB: the 16 MiB machine is refused at HELLO."""
    address = f"unix:{tmp_path / 'migrate.sock'}"
    listener = IncomingListener(address)
    errors: list[BaseException] = []

    def receive():
        config = MachineConfig(kernel="/nonexistent", memory=32 << 20)
        try:
            listener.receive(lambda data: None, config=config, accept_timeout=60)
        except MigrationError as exc:
            errors.append(exc)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    source = counting_vm("tcg")
    try:
        with pytest.raises(MigrationError, match="memory is 16 MiB, this destination's is 32 MiB"):
            migrate(source, address)
        thread.join(30)
        assert errors and "32 MiB" in str(errors[0])
        before = source.memory.read_u64(COUNT)
        assert not source.paused and not source.stopped
        wait_count_above(source, before)          # the source runs on
        finish_cleanly(source, before)
    finally:
        source.close()
        listener.close()


class CorruptingProxy:
    """Forwards a stream both ways and flips one bit of what the source sends, `at` bytes in."""

    def __init__(self, listen_path: str, target_path: str, at: int) -> None:
        import socket

        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(listen_path)
        self.listener.listen(1)
        self.target_path, self.at = target_path, at
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import socket

        source, _ = self.listener.accept()
        target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target.connect(self.target_path)
        threading.Thread(target=self._pump, args=(target, source, None), daemon=True).start()
        self._pump(source, target, self.at)

    @staticmethod
    def _pump(src, dst, flip_at: int | None) -> None:
        seen = 0
        try:
            while chunk := src.recv(65536):
                if flip_at is not None and seen <= flip_at < seen + len(chunk):
                    damaged = bytearray(chunk)
                    damaged[flip_at - seen] ^= 0x10
                    chunk = bytes(damaged)
                seen += len(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(2)
                except OSError:
                    pass


def test_a_corrupted_stream_is_refused_and_the_source_runs_on(accel, tmp_path):
    destination = Destination(f"unix:{tmp_path / 'dst.sock'}")
    CorruptingProxy(str(tmp_path / "proxy.sock"), str(tmp_path / "dst.sock"), at=20000)   # inside the first pages
    source = counting_vm(accel)
    try:
        with pytest.raises(MigrationError) as failure:
            migrate(source, f"unix:{tmp_path / 'proxy.sock'}")
        assert "\n" not in str(failure.value)
        destination.join()
        assert destination.incoming is None
        assert "corrupted" in str(destination.error) and "checksum" in str(destination.error)
        assert not source.paused and not source.stopped
        finish_cleanly(source, source.memory.read_u64(COUNT))
    finally:
        source.close()


def test_a_guest_dirtying_memory_faster_than_the_bandwidth_fails_cleanly_after_the_limit(accel, tmp_path):
    config = MachineConfig(kernel=str(build_source(KVM_GUESTS / "dirtier.S", 64)), memory=16 << 20)
    source = build_vm(config, lambda data: None, accel=choose_accelerator(accel).create())
    destination = Destination(f"unix:{tmp_path / 'dst.sock'}")
    try:
        source.start()
        passes = source.memory.read_u64(0x300000)
        options = MigrationOptions(bandwidth=1 << 20, max_rounds=2)   # 256 pages dirty, ~75 fit in 300 ms
        with pytest.raises(MigrationError, match=r"does not converge: after 2 rounds .* 300 ms downtime"):
            migrate(source, f"unix:{tmp_path / 'dst.sock'}", options)
        destination.join()
        assert destination.incoming is None and "does not converge" in str(destination.error)
        assert not source.paused and not source.stopped
        deadline = time.monotonic() + 30
        while source.memory.read_u64(0x300000) <= passes + 10:   # the guest goes on dirtying
            assert time.monotonic() < deadline and not source.stopped
            time.sleep(0.01)
    finally:
        source.close()


def test_migrate_locally_gives_the_running_vm_and_the_figures(accel):
    from pyvmm.migration import migrate_locally

    source = counting_vm(accel)
    try:
        vm, figures = migrate_locally(source)
        left_at = source.memory.read_u64(COUNT)
    finally:
        source.close()
    try:
        assert not vm.paused
        assert 0 < figures.downtime_ms <= figures.total_s * 1000
        assert figures.mode == "precopy" and figures.rounds >= 2 and figures.bytes_sent > 0
        finish_cleanly(vm, left_at)
    finally:
        vm.close()


def test_a_machine_with_vsock_gets_the_destinations_own_socket(tmp_path):
    """The destination's definition names its own vsock socket: the migrated VM listens there,
    with the guest's CID unchanged."""
    import dataclasses
    import os

    from pyvmm.config import VsockConfig

    config = MachineConfig(kernel=str(build_source(KVM_GUESTS / "roundtrip.S", 64)), memory=16 << 20,
                           vsock=VsockConfig(cid=9, uds=str(tmp_path / "src.vsock")))
    source = build_vm(config, lambda data: None, accel=choose_accelerator("tcg").create())
    source.memory.write_u64(LIMIT, 1 << 62)
    source.start()
    wait_count_above(source, 500)
    listener = IncomingListener(f"unix:{tmp_path / 'dst.sock'}")
    mine = dataclasses.replace(config, vsock=VsockConfig(cid=9, uds=str(tmp_path / "dst.vsock")))
    received: dict = {}
    thread = threading.Thread(target=lambda: received.update(incoming=listener.receive(
        lambda data: None, config=mine, accept_timeout=60)), daemon=True)
    thread.start()
    try:
        migrate(source, f"unix:{tmp_path / 'dst.sock'}")
        left_at = source.memory.read_u64(COUNT)
    finally:
        source.close()
        thread.join(60)
        listener.close()
    vm = received["incoming"].vm
    try:
        assert vm.machine.vsock == VsockConfig(cid=9, uds=str(tmp_path / "dst.vsock"))
        assert os.path.exists(tmp_path / "dst.vsock")
        vm.resume()
        finish_cleanly(vm, left_at)
    finally:
        vm.close()
