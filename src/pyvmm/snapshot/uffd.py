"""Guest RAM filled lazily through userfaultfd ("uffd" restore mode).

RAM is memfd like any VM's (so vhost-user back-ends can map it), registered for missing-page
faults on a userfaultfd. The faults are answered by a handler in another process
(uffd_handler.py: pyvmm's own, started here, or a handler listening on a socket, as
Firecracker's mem_backend Uffd has it), which gets the userfaultfd and the RAM layout over a
Unix socket (SCM_RIGHTS). A handler thread in this process would deadlock: the thread that
touched a missing page may hold the GIL.

pyvmm's handler copies the rest of the file in between faults and says "complete" once every
data page is in; RAM is then unregistered (holes fill with zeroes as anywhere) and the
handler ends. GuestMemory.populate() waits for that. A handler that dies before it is done
leaves RAM that cannot be loaded: the VM is stopped with a vmm-error outcome naming it. A VMM
thread holding the GIL that touched an unloaded page meanwhile would wait in the fault for
ever, and the monitor that notices the handler gone with it (it needs the GIL): where the
compiled group is built, uffd_rescue.c's thread, which needs no GIL, loads RAM from the memory
file once pyvmm's handler has ended, so that thread gets its page and the monitor runs.
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from ..compiled import c_module
from ..errors import UserError
from ..memory import GuestMemory
from ..memory import userfaultfd as uffd
from ..memory.guest_memory import RegionSpec

log = logging.getLogger(__name__)

_NEEDED_IOCTLS = (1 << 3) | (1 << 4)      # _UFFDIO_COPY, _UFFDIO_ZEROPAGE: answers on this range
HANDLER_SCRIPT = Path(__file__).with_name("uffd_handler.py")


class UffdUnavailable(UserError):
    """The host cannot fill guest RAM lazily (no userfaultfd, or none for shared memory)."""


def check_available() -> None:
    """UffdUnavailable, one line, unless this host's userfaultfd can serve memfd RAM."""
    try:
        features = uffd.available_features()
    except uffd.HostMemoryError as exc:
        raise UffdUnavailable(f"uffd restore: this host offers no userfaultfd ({exc.strerror}): use copy or cow") \
            from None
    if not features & uffd.UFFD_FEATURE_MISSING_SHMEM:
        raise UffdUnavailable("uffd restore: this host's userfaultfd cannot serve shared memory "
                              "(no UFFD_FEATURE_MISSING_SHMEM): use copy or cow")


class LazyLoad:
    """The userfaultfd over guest RAM and the handler answering it."""

    def __init__(self, memory: GuestMemory, fd: int, control: socket.socket,
                 process: subprocess.Popen | None, rescue: Any = None) -> None:
        self.memory, self.fd, self.control, self.process = memory, fd, control, process
        self.rescue = rescue  # uffd_rescue.Rescue, or None (no build, or a handler not pyvmm's)
        self.complete = threading.Event()
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._monitor = threading.Thread(target=self._watch, name="uffd-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        """Wait for the handler's "complete" (or its end)."""
        received = b""
        try:
            while b"complete\n" not in received:
                chunk = self.control.recv(64)
                if not chunk:
                    break
                received += chunk
        except OSError:
            pass
        if b"complete\n" in received:
            self._release()
        elif not self._closed:
            pid = self.process.pid if self.process is not None else "external"
            self.failure = f"the userfaultfd handler (pid {pid}) ended before guest RAM was loaded"
            log.error("%s", self.failure)
            self._release()
            if self.on_failure is not None:
                self.on_failure(self.failure)
        self.complete.set()

    def _release(self) -> None:
        """RAM no longer needs the handler: unregister it (waking any waiting fault), close the
        userfaultfd and the socket (pyvmm's handler ends)."""
        with self._lock:
            if self.rescue is not None:
                self.rescue.stop()
            if self.fd >= 0:
                for region in self.memory.regions:
                    try:
                        uffd.unregister(self.fd, region.host_address, region.size)
                    except uffd.HostMemoryError:
                        pass   # unmapped already (closing)
                os.close(self.fd)
                self.fd = -1
            try:
                self.control.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def populate(self) -> None:
        """Return once every page of RAM is in (UffdUnavailable if the handler died first)."""
        if not self.complete.is_set():
            if self.process is not None:
                try:
                    self.control.sendall(b"populate\n")
                except OSError:
                    pass
                self.complete.wait()
            else:
                self._touch_every_page()
        if self.failure is not None:
            raise UffdUnavailable(self.failure)

    def _touch_every_page(self) -> None:
        """A handler that is not pyvmm's: fault every page in, then let it go."""
        for region in self.memory.regions:
            for offset in range(0, region.size, os.sysconf("SC_PAGE_SIZE")):
                region.mmap[offset]
        self._release()
        self.complete.set()

    def close(self) -> None:
        self._closed = True
        self._release()
        self.control.close()
        if self.process is not None:
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _rescue(fd: int, memory_fd: int, pid: int, mappings: list[tuple[int, int, int]]) -> Any:
    """uffd_rescue.c's thread for pyvmm's handler process `pid`, or None where it is not built
    (or PYVMM_COMPILED=0) or the host has no pidfd."""
    uffd_rescue = c_module("pyvmm.snapshot.uffd_rescue")
    if uffd_rescue is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        log.info("uffd restore: no pidfd for the handler (%s): a VMM thread may wait for ever if it dies",
                 exc.strerror)
        return None
    try:
        return uffd_rescue.Rescue(fd, memory_fd, pidfd, mappings, os.sysconf("SC_PAGE_SIZE"))
    finally:
        os.close(pidfd)


def lazy_memory(specs: list[RegionSpec], file_offsets: list[int], memory_fd: int, *,
                handler_socket: str | None = None, prefetch: bool = True) -> tuple[GuestMemory, LazyLoad]:
    """Guest RAM of `specs`, each region filled on demand from the memory file `memory_fd` at
    its offset in `file_offsets`, by pyvmm's handler (or the one listening at `handler_socket`).
    `prefetch`: pyvmm's handler copies in the rest between faults (else only when populated)."""
    check_available()
    memory = GuestMemory.from_specs(specs)
    fd = -1
    control = None
    try:
        fd = uffd.open_userfaultfd()
        uffd.handshake(fd, uffd.UFFD_FEATURE_MISSING_SHMEM)
        for region in memory.regions:
            allowed = uffd.register(fd, region.host_address, region.size, uffd.UFFDIO_REGISTER_MODE_MISSING)
            if allowed & _NEEDED_IOCTLS != _NEEDED_IOCTLS:
                raise UffdUnavailable("uffd restore: this host's userfaultfd cannot copy into guest RAM")
        mappings = [{"base_host_virt_addr": region.host_address, "size": region.size, "offset": offset,
                     "page_size": os.sysconf("SC_PAGE_SIZE"), "page_size_kib": os.sysconf("SC_PAGE_SIZE") >> 10}
                    for region, offset in zip(memory.regions, file_offsets)]
        process = None
        rescue = None
        if handler_socket is None:
            control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with theirs:
                # by path and without site: the handler needs the standard library and memory/ only
                argv = [sys.executable, "-S", str(HANDLER_SCRIPT), "--fd", str(theirs.fileno())]
                process = subprocess.Popen(argv + ([] if prefetch else ["--no-prefetch"]),
                                           pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            rescue = _rescue(fd, memory_fd, process.pid, [(region.host_address, region.size, offset)
                                                          for region, offset in zip(memory.regions, file_offsets)])
            fds = [fd, memory_fd]
        else:
            control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                control.connect(handler_socket)
            except OSError as exc:
                raise UffdUnavailable(f"uffd restore: cannot reach the handler at {handler_socket}: "
                                      f"{exc.strerror}") from None
            fds = [fd]
        control.sendmsg([json.dumps(mappings).encode()],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    except BaseException as exc:
        if control is not None:
            control.close()
        if fd >= 0:
            os.close(fd)
        memory.close()
        if isinstance(exc, uffd.HostMemoryError):
            raise UffdUnavailable(f"uffd restore: {exc.strerror}") from None
        raise
    lazy = LazyLoad(memory, fd, control, process, rescue)
    memory.populator = lazy.populate
    memory.on_close.append(lazy.close)
    return memory, lazy
