"""Snapshots: a paused VM to two files, and a paused VM back from them.

    save_snapshot(vm, "vm.state", "vm.mem")                 # vm paused; Full
    save_snapshot(vm, "vm.state", "vm.diff", diff=True)     # the pages written since the last one
    merge_diff("vm.diff", "vm.mem")                         # vm.mem now holds the Diff's moment
    vm = load_snapshot("vm.state", "vm.mem", console_write, mode="copy")   # paused; vm.resume()

The state file (state_file.py) is the VmState in a checksummed container; the memory file
(memory_file.py) is guest RAM, sparse. A VM loaded from them is a new VM in this process:
devices and their host sides are made again from the machine description in the state
(disk images reopened, TAPs and vsock sockets opened afresh), so the VM the snapshot was
taken of must have let go of them (stopped), unless `prepare` points the copy elsewhere.

Restore modes (`mode=`), and the devices each supports:
- "copy": guest RAM is fresh shared memory (memfd) with the file read into it, skipping its
  holes. Every device, vhost-user back-ends included (they map RAM by its memfd).
- "cow": guest RAM is a private copy-on-write mapping of the memory file: nothing is read up
  front, a page comes from the file on first touch, writes stay in this process. There is no
  memfd to hand out, so devices whose back-end shares guest RAM by fd (vhost-user-blk) are
  refused with one line. The memory file must stay in place while the VM runs.
- "uffd": memfd RAM like copy, filled lazily through userfaultfd by a handler process
  (uffd.py): a page is copied from the file when first touched, by a vCPU, a device or the
  kernel. Every device; with a vhost-user back-end (which touches RAM through its own
  mapping, where no fault is seen) all of RAM is loaded before the back-end gets it.
  Where the host has no usable userfaultfd, refused with one line.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import UserError
from ..memory import GuestMemory, MemoryRegion
from ..memory.guest_memory import RegionSpec
from ..persist import StateError
from .memory_file import (MemoryFileError, file_layout, merge_diff, open_memory_file, read_into, write_diff,
                          write_full)
from .state_file import decode_state, encode_state, memory_regions, read_snapshot, read_state_file, write_state_file

if TYPE_CHECKING:
    from ..config import MachineConfig
    from ..vm import Vm
    from ..vm_state import VmState

RESTORE_MODES = ("copy", "cow", "uffd")

__all__ = ["RESTORE_MODES", "SnapshotError", "MemoryFileError", "SavedSnapshot", "StateError", "decode_state", "encode_state",
           "load_snapshot", "merge_diff", "read_snapshot", "read_state_file", "save_snapshot", "track_dirty_pages"]


class SnapshotError(UserError):
    """A snapshot that cannot be taken or loaded as asked (one line)."""


@dataclass(frozen=True)
class SavedSnapshot:
    state_bytes: int          # size of the state file
    memory_bytes: int         # data (non-hole) bytes written to the memory file
    memory_size: int          # the memory file's size: all of guest RAM


def save_snapshot(vm: "Vm", snapshot_path: str | os.PathLike, mem_file_path: str | os.PathLike, *,
                  diff: bool = False, vm_config: dict[str, Any] | None = None) -> SavedSnapshot:
    """Write paused `vm`'s state to `snapshot_path` and its RAM to `mem_file_path`: all of it
    (Full), or with `diff` only the pages written since dirty tracking started or since the
    previous snapshot (the VM must be tracking them: track_dirty_pages(vm)). The VM
    stays paused and unchanged; each file is replaced only once complete. `vm_config`: the
    VM's configuration document (the API's), recorded in the state file."""
    state = vm.save()          # VmNotPaused, one line, unless paused
    snapshot_path, mem_file_path = os.fspath(snapshot_path), os.fspath(mem_file_path)
    if os.path.abspath(snapshot_path) == os.path.abspath(mem_file_path):
        raise SnapshotError(f"{snapshot_path}: the state and the memory need two files")
    if diff:
        pages = _dirty_pages(vm)
        if pages is None:
            raise SnapshotError("a Diff snapshot needs dirty page tracking since the previous snapshot "
                                "(track_dirty_pages, or pyvmm.snapshot.track_dirty_pages(vm))")
        try:
            written = write_diff(vm.memory, mem_file_path, pages)
            write_state_file(snapshot_path, state, vm_config=vm_config)
        except BaseException:
            _UNSAVED[vm] = pages    # the next Diff holds these pages too
            raise
    else:
        written = write_full(vm.memory, mem_file_path)
        write_state_file(snapshot_path, state, vm_config=vm_config)
        _dirty_pages(vm)           # the next Diff holds what is written after this snapshot
    _UNSAVED.pop(vm, None)
    return SavedSnapshot(os.path.getsize(snapshot_path), written, vm.memory.size)


DIRTY_READER = "default"    # the dirty log's reader for Diff snapshots (track_dirty_pages starts it)
# Dirty pages taken from a VM's log for a Diff that failed to be written: the next Diff adds them.
_UNSAVED: "weakref.WeakKeyDictionary[Vm, Any]" = weakref.WeakKeyDictionary()


def track_dirty_pages(vm: "Vm") -> None:
    """Log the pages `vm` writes from now on, so the next snapshot can be a Diff (Firecracker's
    track_dirty_pages). DirtyTrackingUnavailable (one line) where the host cannot."""
    vm.start_dirty_log(DIRTY_READER)


def _dirty_pages(vm: "Vm"):
    """The pages written since tracking began or since the previous snapshot (the log starts
    over), or None when the VM is not tracking them for snapshots."""
    from ..vm import VmError

    if not vm.dirty_logging:
        return None
    try:
        pages = vm.dirty_log(DIRTY_READER)
    except VmError:        # tracked for another reader (a migration), not for snapshots
        return None
    unsaved = _UNSAVED.pop(vm, None)
    return pages if unsaved is None else pages.merge(unsaved)


def load_snapshot(snapshot_path: str | os.PathLike, mem_file_path: str | os.PathLike | None,
                  console_write: Callable[[bytes], None], *, mode: str = "copy", accel=None,
                  config: "MachineConfig | None" = None,
                  prepare: Callable[["VmState"], "VmState"] | None = None,
                  uffd_handler: str | None = None, prefetch: bool = True, carryover=None) -> "Vm":
    """A started, paused Vm continuing the snapshot (resume() runs it). `mode`: copy, cow or
    uffd (see the module's docstring). `accel`: an accelerator instance of the kind the state
    was saved on (default: a new one); `config`: the machine the caller expects (refused unless
    it is the snapshot's); `prepare`: rewrites the state before anything is built (another
    TAP, another vsock socket); `uffd_handler`: with mode uffd, the socket of a page-fault
    handler that has the memory file itself (Firecracker's Uffd backend; mem_file_path is then
    not read), instead of pyvmm's; `prefetch`: pyvmm's handler loads the rest of RAM between
    faults (else only what is touched, until memory.populate()); `carryover`: the host sides a
    VM of this process being replaced hands over (restore.carry_over: its vsock connections go
    on; its memory is not used and is closed). Bad files, a memory file of the wrong size, a mode a
    device cannot use: one line (StateError or SnapshotError); nothing is left built."""
    if mode not in RESTORE_MODES:
        raise SnapshotError(f"restore mode {mode!r} is not one of {', '.join(RESTORE_MODES)}")
    if uffd_handler is not None and mode != "uffd":
        raise SnapshotError("a page-fault handler socket is for restore mode uffd")
    if carryover is not None and carryover.memory is not None:
        carryover.memory.close()   # RAM comes from the memory file
        carryover.memory = None
    state = read_state_file(os.fspath(snapshot_path))
    if prepare is not None:
        state = prepare(state)
    sharing = _shares_ram_by_fd(state)
    if mode == "cow" and sharing:
        raise SnapshotError(f"restore mode cow: {sharing[0]} shares guest RAM with its vhost-user back-end by fd, "
                            "which a private mapping of the memory file cannot give: use copy or uffd")
    regions = memory_regions(state)
    layout = file_layout(regions)
    specs = [RegionSpec(base, size) for base, size, _ in layout]
    lazy = None
    if uffd_handler is not None:
        from .uffd import lazy_memory

        memory, lazy = lazy_memory(specs, [offset for _, _, offset in layout], -1, handler_socket=uffd_handler)
    else:
        if mem_file_path is None:
            raise SnapshotError("a memory file is needed")
        path = os.fspath(mem_file_path)
        fd = open_memory_file(path, regions)
        try:
            memory, lazy = _memory(mode, specs, layout, fd, path, prefetch)
        finally:
            os.close(fd)
    from ..restore import restore_vm

    try:
        if sharing:
            memory.populate()      # a vhost-user back-end touches RAM where no fault is seen
        vm = restore_vm(state, memory, console_write, accel=accel, config=config, carryover=carryover)
    except BaseException:
        memory.close()
        raise
    if lazy is not None:
        _stop_on_failure(vm, lazy)
    return vm


def _memory(mode: str, specs: list[RegionSpec], layout: list[tuple[int, int, int]], fd: int, path: str,
            prefetch: bool):
    """(guest RAM holding the memory file's contents as `mode` provides them, its LazyLoad or None)."""
    if mode == "copy":
        memory = GuestMemory.from_specs(specs)
        try:
            read_into(memory, fd, path)
        except BaseException:
            memory.close()
            raise
        return memory, None
    if mode == "cow":
        regions: list[MemoryRegion] = []
        try:
            for base, size, offset in layout:
                regions.append(MemoryRegion(base, size, file=(fd, offset)))
        except BaseException:
            for region in regions:
                region.close()
            raise
        return GuestMemory(regions), None
    from .uffd import lazy_memory

    return lazy_memory(specs, [offset for _, _, offset in layout], fd, prefetch=prefetch)


def _stop_on_failure(vm: "Vm", lazy) -> None:
    """A page-fault handler that dies leaves RAM that cannot be loaded: the VM stops, saying so."""
    from ..vm import EXIT_VMM_ERROR, VmOutcome

    def stop(message: str) -> None:
        vm.request_stop(VmOutcome("vmm-error", EXIT_VMM_ERROR, message))

    lazy.on_failure = stop
    if lazy.failure is not None:
        stop(lazy.failure)


def _shares_ram_by_fd(state: "VmState") -> list[str]:
    """Device-tree ids of the devices whose back-end maps guest RAM by its fd (vhost-user)."""
    machine = state.machine.to_config()
    return [machine.disk_id(index) for index, disk in enumerate(machine.disks) if disk.vhost_user is not None]
