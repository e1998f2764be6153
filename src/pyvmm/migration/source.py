"""The sending side: pre-copy a running VM to a destination, then hand it over.

1. Connect, send HELLO (the machine), wait for READY: a destination that cannot continue
   this machine refuses here, before any memory moves.
2. Start dirty-page tracking, then send all of RAM while the guest runs (round 1), then
   the pages dirtied meanwhile, round after round, until the estimated time to send what
   is left fits the downtime limit.
3. Pause; send the last dirty pages, the VmState and END; wait for the destination's ACK
   (it built the VM when HELLO came and has loaded the state into it, paused); send COMMIT (the destination resumes it) and only then
   stop this VM, with outcome "migrated".

Until the ACK has come the source owns the VM: any failure (connection cut, dead or
refusing peer, corrupted answer, cancel, no convergence within the limits) stops tracking,
resumes the VM if this migration paused it and raises MigrationError in one line.
Where the host cannot track dirty pages, the migration is stop-and-copy: pause, send all.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..errors import UserError
from ..vm import EXIT_OK, VmOutcome
from .channel import ACK, COMMIT, END, HELLO, READY, STATE, Address, Channel, MigrationError, connect, parse_address
from ..snapshot.state_file import encode_state
from .machine import hello
from .pages import FIRST_PASS, PAGE, PageWriter, send_all_ram, send_pages

log = logging.getLogger(__name__)

DEFAULT_DOWNTIME_MS = 300       # QEMU's default downtime limit
DEFAULT_MAX_ROUNDS = 30
SETTLED_MS = 2.0                # a final round estimated this short is not worth another round
SHRINKING = 0.75                # a round leaving fewer than this share of the last one's pages helps
CONNECT_TIMEOUT = 10.0
ACK_TIMEOUT = 120.0             # the destination builds the VM before it answers
CANCEL_GRACE = 2.0
DIRTY_READER = "migration"     # this migration's own log (a Diff-snapshot series keeps its own)


class MigrationCancelled(MigrationError):
    """The user cancelled the migration: the VM runs on here."""


@dataclass(frozen=True)
class MigrationOptions:
    downtime_ms: float = DEFAULT_DOWNTIME_MS   # the longest pause the final round may take (estimated)
    bandwidth: float | None = None             # bytes/s the stream may use; None: as fast as it goes
    timeout: float | None = None               # seconds for the whole migration; None: no limit
    max_rounds: int = DEFAULT_MAX_ROUNDS       # dirty-page rounds after the first pass before giving up

    def __post_init__(self) -> None:
        if not self.downtime_ms > 0:
            raise MigrationError(f"the downtime limit must be positive (got {self.downtime_ms} ms)")
        if self.bandwidth is not None and not self.bandwidth >= PAGE:
            raise MigrationError(f"the bandwidth limit must be at least {PAGE} bytes/s (got {self.bandwidth})")
        if self.timeout is not None and not self.timeout > 0:
            raise MigrationError(f"the timeout must be positive (got {self.timeout} s)")
        if self.max_rounds < 1:
            raise MigrationError(f"max rounds must be at least 1 (got {self.max_rounds})")


@dataclass
class MigrationProgress:
    """What a progress display shows; also the final figures."""
    status: str = "setup"        # setup | precopy | stop-and-copy | completing | completed | failed | cancelled
    mode: str = "precopy"        # precopy | stop-and-copy (no dirty tracking on this host)
    address: str = ""
    round: int = 0
    bytes_sent: int = 0
    pages_sent: int = 0          # data pages (zero pages travel as markers)
    zero_pages: int = 0
    ram_bytes: int = 0
    remaining_pages: int = 0     # dirty pages still to send, as last counted
    dirty_rate: float = 0.0      # pages dirtied per second in the last round
    rate: float = 0.0            # bytes/s the stream moved in the last round
    elapsed_s: float = 0.0
    downtime_ms: float | None = None  # from pausing the VM to COMMIT sent (set at the end)
    # Where the downtime went, in ms, in order: pause, dirty_sync, final_pages, save, disks,
    # state (encode and send), ack (from END to the destination's ACK) and the destination's
    # own destination_decode_ms and destination_load_ms within it, commit; prepare_ms: the
    # destination building its VM before any memory moved (not downtime).
    phases: dict[str, float] = field(default_factory=dict)
    total_s: float | None = None
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # per round: pages, seconds, dirty

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for a terminal."""
        if self.status == "completed":
            return (f"migrated in {self.total_s:.2f} s, downtime {self.downtime_ms:.0f} ms, "
                    f"{self.round} round(s), {self.bytes_sent / 2**20:.1f} MiB sent")
        return (f"{self.status}: round {self.round}, {self.bytes_sent / 2**20:.1f} MiB sent, "
                f"{self.remaining_pages * PAGE / 2**20:.1f} MiB dirty, {self.dirty_rate * PAGE / 2**20:.1f} MiB/s dirtied, "
                f"{self.rate / 2**20:.1f} MiB/s sent, {self.elapsed_s:.1f} s")

    def downtime_line(self) -> str:
        """Where the downtime went: 'pause 1.0 + dirty_sync 0.2 + ... ms'."""
        parts = [f"{name.removesuffix('_ms')} {ms:.1f}" for name, ms in self.phases.items()
                 if name != "prepare_ms" and not name.startswith("destination_")]
        inside = [f"{name.removeprefix('destination_').removesuffix('_ms')} {ms:.1f}" for name, ms in self.phases.items()
                  if name.startswith("destination_") and name != "destination_prepare_ms"]
        return " + ".join(parts) + " ms" + (f" (destination: {', '.join(inside)} ms)" if inside else "")


class Migration:
    """One outgoing migration of `vm`. run() does it (blocking); cancel() and progress() are
    safe from other threads."""

    def __init__(self, vm, address: str | Address, options: MigrationOptions | None = None, *,
                 on_progress: Callable[[MigrationProgress], None] | None = None) -> None:
        self.vm = vm
        self.address = address if isinstance(address, Address) else parse_address(address)
        self.options = options or MigrationOptions()
        self.on_progress = on_progress
        self._progress = MigrationProgress(address=str(self.address), ram_bytes=vm.memory.size)
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._channel: Channel | None = None
        self._started = 0.0
        self._paused_here = False
        self._tracking = False
        self._handed_over = False     # COMMIT sent: the destination runs the VM
        self._final_dirty: Any = None  # the DirtyBitmap counted last, not yet sent
        self.paused_at: float | None = None  # time.monotonic() when this migration paused the VM
        self._disks_handed: list[Any] = []  # virtio-blk devices whose image lock is released
        self._phases: dict[str, float] = {}
        self._clock = 0.0                   # when the last downtime phase ended

    def progress(self) -> MigrationProgress:
        with self._lock:
            self._progress.elapsed_s = time.monotonic() - self._started if self._started else 0.0
            return MigrationProgress(**{**asdict(self._progress), "history": list(self._progress.history),
                                        "phases": dict(self._progress.phases)})

    def cancel(self) -> None:
        """Stop the migration: the VM runs on here (unless the destination already has it).
        The sending thread sees it between frames and tells the destination; a send blocked
        on a peer that takes nothing is woken after CANCEL_GRACE seconds by closing the stream."""
        self._cancelled.set()
        timer = threading.Timer(CANCEL_GRACE, self._wake_blocked)
        timer.daemon = True
        timer.start()

    def _wake_blocked(self) -> None:
        channel = self._channel
        if channel is not None and self._progress.status in ("setup", "precopy", "stop-and-copy", "completing"):
            try:
                channel.sock.shutdown(2)
            except OSError:
                pass

    def run(self) -> MigrationProgress:
        self._started = time.monotonic()
        try:
            self._migrate()
        except BaseException as exc:
            failure = exc
            if self._cancelled.is_set() and isinstance(exc, MigrationError) and not isinstance(exc, MigrationCancelled):
                failure = MigrationCancelled("the migration was cancelled: the VM runs on here")
            self._give_back(failure)
            if self._handed_over:
                return self.progress()
            if failure is exc:
                raise
            raise failure from None
        return self.progress()

    # --- the steps ----------------------------------------------------------------------------

    def _migrate(self) -> None:
        vm, options = self.vm, self.options
        if vm.stopped:
            raise MigrationError("the VM has stopped: nothing to migrate")
        if vm.device_manager is None or vm.machine is None:
            raise MigrationError("this VM was not built from a machine description: it cannot be migrated")
        channel = Channel(connect(self.address, CONNECT_TIMEOUT), str(self.address))
        self._channel = channel
        if options.timeout is not None:
            channel.deadline = self._started + options.timeout
        self._check_cancel()
        from ..vm_state import MachineDescription

        channel.send_preamble()
        channel.send_json(HELLO, hello(MachineDescription.from_config(vm.machine), vm.accel.name, vm.memory,
                                       vm.device_manager.tree.save()))
        channel.receive_preamble()
        clock = time.monotonic()
        channel.expect_json(READY)
        self._phases["prepare_ms"] = _ms_since(clock)
        self._check_cancel()

        precopy = not vm.paused and self._start_tracking()
        if precopy:
            self._precopy(channel)
        else:
            self._update(mode="stop-and-copy", status="stop-and-copy")
            self._pause()
            self._update(round=1)
            self._send_round(channel, None)
        self._complete(channel, precopy)

    def _start_tracking(self) -> bool:
        start = getattr(self.vm, "start_dirty_log", None)
        if start is None:
            log.info("migration: this pyvmm has no dirty-page tracking: stop-and-copy")
            return False
        try:
            start(DIRTY_READER)
        except UserError as exc:  # memory.dirty.DirtyTrackingUnavailable: this host cannot track
            log.info("migration: %s: stop-and-copy", exc)
            return False
        self._tracking = True
        return True

    def _precopy(self, channel: Channel) -> None:
        vm, options = self.vm, self.options
        self._update(status="precopy", round=1)
        self._send_round(channel, None)
        previous: int | None = None
        while True:
            dirty = vm.dirty_log(DIRTY_READER)
            count = dirty.count()
            last = self._progress.history[-1]
            rate = self._progress.rate or 1.0
            if options.bandwidth:
                rate = min(rate, options.bandwidth)
            self._update(remaining_pages=count, dirty_rate=count / max(last["seconds"], 1e-6))
            step = next_step(count, previous, count * (PAGE + 16) / rate * 1000, options.downtime_ms,
                             self._progress.round, options.max_rounds)
            if step == "final":
                self._final_dirty = dirty
                return
            previous = count
            if step == "fail":
                raise MigrationError(
                    f"the migration does not converge: after {options.max_rounds} rounds the guest still dirties "
                    f"{self._progress.dirty_rate * PAGE / 2**20:.1f} MiB/s against {rate / 2**20:.1f} MiB/s sent "
                    f"({count} pages left, more than the {options.downtime_ms:g} ms downtime allows)")
            self._update(round=self._progress.round + 1)
            self._send_round(channel, dirty)

    def _complete(self, channel: Channel, precopy: bool) -> None:
        vm = self.vm
        self._update(status="completing")
        if precopy:
            self._pause()
            last = vm.dirty_log(DIRTY_READER)
            last.merge(self._final_dirty)
            self._phase("dirty_sync")
            self._update(round=self._progress.round + 1, remaining_pages=last.count())
            self._send_round(channel, last)
        self._phase("final_pages")
        state = vm.save()
        self._phase("save")
        self._hand_over_disks()
        self._phase("disks")
        channel.send(STATE, encode_state(state))
        channel.send_json(END, {"pages": self._progress.pages_sent, "zero_pages": self._progress.zero_pages,
                                "rounds": self._progress.round})
        self._phase("state")
        saved_deadline = channel.deadline
        channel.deadline = min(saved_deadline or float("inf"), time.monotonic() + ACK_TIMEOUT)
        _, answer = channel.expect(ACK)
        self._phase("ack")
        self._phases.update({f"destination_{name}": value for name, value in _figures(answer).items()})
        # The destination holds the VM now: past this point this VM never runs again.
        channel.send(COMMIT)
        self._handed_over = True
        self._phase("commit")
        downtime = (time.monotonic() - (self.paused_at or time.monotonic())) * 1000
        self._stop_tracking()
        channel.close()
        total = time.monotonic() - self._started
        # The figures first: whoever waits for the VM to end reads them as final.
        self._update(status="completed", downtime_ms=downtime, total_s=total, remaining_pages=0,
                     bytes_sent=channel.bytes_sent, phases=dict(self._phases))
        # Stopping wakes the parked run loops by itself; a resume() here would thaw guest time
        # on vCPUs whose threads are already ending.
        vm.request_stop(VmOutcome("migrated", EXIT_OK, f"migrated to {self.address}"))

    def _phase(self, name: str) -> None:
        """The downtime phase `name` ended now."""
        now = time.monotonic()
        self._phases[f"{name}_ms"] = round((now - self._clock) * 1000, 2)
        self._clock = now

    def _send_round(self, channel: Channel, dirty) -> None:
        """One pass: all of RAM (dirty None) or the pages of a DirtyBitmap."""
        started = time.monotonic()
        sent_before = channel.bytes_sent
        writer = PageWriter(channel, self._after_frame, FIRST_PASS if dirty is None else 0)
        if dirty is None:
            send_all_ram(self.vm.memory, writer)
        else:
            send_pages(self.vm.memory, dirty.pages(), writer)
        seconds = time.monotonic() - started
        with self._lock:
            progress = self._progress
            progress.pages_sent += writer.pages
            progress.zero_pages += writer.zero_pages
            progress.rate = (channel.bytes_sent - sent_before) / max(seconds, 1e-6)
            progress.history.append({"round": progress.round, "pages": writer.pages, "zero_pages": writer.zero_pages,
                                     "seconds": seconds})
        self._notify()

    def _after_frame(self, size: int) -> None:
        channel = self._channel
        assert channel is not None
        with self._lock:
            self._progress.bytes_sent = channel.bytes_sent
        self._check_cancel()
        bandwidth = self.options.bandwidth
        if bandwidth:
            ahead = channel.bytes_sent / bandwidth - (time.monotonic() - self._started)
            if ahead > 0:
                if self._cancelled.wait(ahead):
                    self._check_cancel()
        if self.options.timeout is not None and time.monotonic() - self._started > self.options.timeout:
            raise MigrationError(f"the migration did not finish within {self.options.timeout:g} s (--timeout); "
                                 f"the VM runs on here")
        self._notify()

    # --- helpers ------------------------------------------------------------------------------

    def _pause(self) -> None:
        self.paused_at = self._clock = time.monotonic()
        if not self.vm.paused:
            self.vm.pause()
            self._paused_here = True
        self._phase("pause")
        if self.vm.stopped:
            raise MigrationError(f"the VM stopped during the migration ({self.vm.outcome.message})")

    def _disks(self) -> list[Any]:
        manager = self.vm.device_manager
        return [manager.device(node.id) for node in manager.tree if node.kind == "virtio-blk"
                and hasattr(manager.device(node.id), "hand_over_image")]

    def _hand_over_disks(self) -> None:
        """Disk images on a path both sides see: synced and unlocked for the destination."""
        for disk in self._disks():
            disk.hand_over_image()
            self._disks_handed.append(disk)

    def _take_back_disks(self) -> None:
        """After a failure: the images' locks again. A destination that opened an image
        lets go of it when it gives up, so wait a little for that."""
        deadline = time.monotonic() + 10
        while self._disks_handed:
            try:
                self._disks_handed[-1].take_back_image()
                self._disks_handed.pop()
            except UserError as exc:
                if time.monotonic() > deadline:
                    log.warning("migration failed and %s: the VM runs on without the image's lock", exc)
                    self._disks_handed.pop()
                else:
                    time.sleep(0.1)

    def _check_cancel(self) -> None:
        if self._cancelled.is_set():
            raise MigrationCancelled("the migration was cancelled: the VM runs on here")

    def _stop_tracking(self) -> None:
        if self._tracking:
            self._tracking = False
            try:
                self.vm.stop_dirty_log(DIRTY_READER)
            except Exception:  # noqa: BLE001 - the VM runs on either way
                log.warning("stopping dirty-page tracking failed", exc_info=True)

    def _give_back(self, failure: BaseException) -> None:
        """After a failure before the ACK: the VM is this side's, running as it was."""
        if self._handed_over:   # a failure after COMMIT: the VM is the destination's all the same
            log.warning("after the handover: %s", failure)
            self.vm.request_stop(VmOutcome("migrated", EXIT_OK, f"migrated to {self.address}"))
            return
        channel = self._channel
        if channel is not None:
            channel.send_error(str(failure).splitlines()[0] if str(failure) else type(failure).__name__)
            channel.close()
        self._stop_tracking()
        if not self._handed_over:
            self._take_back_disks()
        if self._paused_here and not self._handed_over:
            self._paused_here = False
            self.vm.resume()
        self._update(status="cancelled" if isinstance(failure, MigrationCancelled) else "failed",
                     error=str(failure).splitlines()[0] if str(failure) else type(failure).__name__)

    def _update(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._progress, name, value)
        self._notify()

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress())


def next_step(count: int, previous: int | None, estimate_ms: float, limit_ms: float, round: int,
              max_rounds: int) -> str:
    """After a pre-copy round that left `count` dirty pages (the round before left `previous`;
    None after the first pass), whose sending is estimated at `estimate_ms`: "final" (pause
    and send them), "again" (another round) or "fail" (no convergence). Within the limit is
    enough to stop; but while each round still leaves markedly fewer pages, another short round
    makes the pause shorter than the limit allows (a guest rewriting the same pages keeps
    about as many dirty each round: then there is nothing to gain by waiting)."""
    if estimate_ms <= limit_ms:
        shrinking = previous is None or count < previous * SHRINKING
        if estimate_ms <= SETTLED_MS or not shrinking or round > max_rounds:
            return "final"
        return "again"
    return "fail" if round > max_rounds else "again"


def _ms_since(clock: float) -> float:
    return round((time.monotonic() - clock) * 1000, 2)


def _figures(payload: bytes) -> dict[str, float]:
    """The destination's phase figures in its ACK (nothing it sends there can fail the migration)."""
    import json

    try:
        value = json.loads(payload) if payload else {}
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def migrate(vm, address: str, options: MigrationOptions | None = None, *,
            on_progress: Callable[[MigrationProgress], None] | None = None) -> MigrationProgress:
    """Migrate running `vm` to the destination waiting at `address`; the final figures.
    On success `vm` has stopped (outcome "migrated"); on MigrationError it runs on."""
    return Migration(vm, address, options, on_progress=on_progress).run()
