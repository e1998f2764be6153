"""DiskTransfers: a VM's large disk reads and writes moved by threads that never take the GIL.

Why: a software-CPU VM's threads share one host CPU (host/cpu_affinity.py), so a 1 MiB read
served where the guest kicked copies its megabyte while the guest stands still; QEMU's worker
threads copy on another CPU while its vCPU runs. A pool of Python threads was slower than none
(tried: each job took the GIL twice, on another CPU): here the copies run in C threads
(transfer_threads.c) and the GIL is taken once per batch of ended transfers, by the I/O
thread, which hands each device its own at once (devices/virtio/host_side.DiskTransfers).

One per VM (the builder makes it, with the I/O thread it reports on), shared by its disks. A
paused VM's transfers have all moved their data (pause() waits; nothing starts new ones while
the vCPUs and the I/O thread are held); what ended meanwhile is handed over after the resume.
`available()` says whether the C module is built and PYVMM_DISK_THREADS (default 2; 0 turns
them off) allows them: without them a disk serves every request where it was kicked.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from ..compiled import c_module
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..memory.guest_memory import GuestMemory

ENV = "PYVMM_DISK_THREADS"
DEFAULT_THREADS = 2
MAX_THREADS = 64
_C_MODULE = "pyvmm.host.transfer_threads"


def wanted_threads(environ=os.environ) -> int:
    text = environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_THREADS
    if not text.isdigit() or int(text) > MAX_THREADS:
        raise ConfigError(f"{ENV}={text}: a number of threads from 0 (none: requests are served where they "
                          f"were kicked) to {MAX_THREADS}")
    return int(text)


def available(environ=os.environ) -> bool:
    return wanted_threads(environ) > 0 and c_module(_C_MODULE) is not None


Finished = Callable[[list[tuple[object, int]]], None]


def hand_out(ended: list[tuple[Finished, object, int]]) -> None:
    """Ended transfers (finished, item, errno or 0) to their devices: each device's in one call."""
    by_device: dict[Finished, list[tuple[object, int]]] = {}
    for finished, item, error in ended:
        by_device.setdefault(finished, []).append((item, error))
    for finished, items in by_device.items():
        finished(items)


class DiskTransfers:
    def __init__(self, iothread, threads: int | None = None) -> None:
        module = c_module(_C_MODULE)
        if module is None:
            raise RuntimeError("disk transfer threads: the compiled group is not in use")
        self._threads = module.Transfers(threads if threads is not None else wanted_threads())
        self._iothread = iothread
        iothread.add_eventfd(self._threads.fd, self.collect)
        self._closed = False
        self._memory: GuestMemory | None = None  # the RAM _regions describe, to the C threads
        self._regions: tuple[tuple[int, memoryview], ...] = ()

    def start(self, finished: Finished, item: object, writing: bool, fd: int, offset: int, memory: GuestMemory,
              pieces: list[tuple[int, int]], skip: int, length: int) -> None:
        """Move bytes [skip, skip + length) of `pieces` (guest address, size) in guest RAM from or
        to `fd` at `offset` (RAM's mappings held until then); `finished([(item, errno or 0), ...])`
        gets it later on the I/O thread, with the device's other transfers that ended by then."""
        if memory is not self._memory:
            self._memory = memory
            self._regions = tuple((int(region.guest_base), region.view) for region in memory.regions)
        self._threads.start((finished, item), writing, fd, offset, self._regions, pieces, skip, length)

    def collect(self) -> None:
        """Hand the ended transfers to their devices, each device's in one call (I/O thread)."""
        hand_out([(finished, item, error) for (finished, item), error in self._threads.take()])

    def wait_idle(self) -> None:
        """Return once no transfer started so far moves data (their ends are collected later)."""
        self._threads.wait_idle()

    @property
    def moving(self) -> int:
        return self._threads.moving

    # The VM's Pausable: held still means no data moving into or out of guest RAM.
    def pause(self) -> None:
        self.wait_idle()

    def resume(self) -> None:
        pass

    def close(self) -> None:
        """After the devices closed: wait for what moves, end the threads, let guest RAM go."""
        if self._closed:
            return
        self._closed = True
        self._iothread.remove_reader(self._threads.fd)
        self._threads.close()
