"""The userfaultfd page-fault handler: a process of its own that fills guest RAM from a memory
file as the guest touches it.

    python -m pyvmm.snapshot.uffd_handler --fd N              # started by pyvmm (uffd restore)
    python -m pyvmm.snapshot.uffd_handler --socket PATH --mem-file FILE   # Firecracker's way

Why a process: a fault on a missing page blocks the thread that touched it until someone
answers. In the VMM's own process that thread may hold Python's GIL (device emulation, the
software CPU's page walks), and a handler thread there would wait for the GIL forever.

It receives, over a Unix socket, one message: a JSON list of the RAM mappings
(Firecracker's GuestRegionUffdMapping: base_host_virt_addr, size, offset into the memory
file, page_size) with the userfaultfd and, from pyvmm, the memory file's fd as SCM_RIGHTS.
It answers each fault with UFFDIO_COPY from its own read-only mapping of the file (the
data around the fault, up to BLOCK) or UFFDIO_ZEROPAGE where the file has a hole. Between
faults it copies the rest of the file's data in (prefetch), so a VM needs it only for a
while: once every data page is in it writes "complete" on the socket, closes the
userfaultfd and ends; the VMM then unregisters RAM (holes fill with zeroes as usual).
"populate" on the socket asks it to finish (with --no-prefetch it loads only what is touched
until then; the VMM waits for "complete").
The socket closing (the VM went away) ends it.
"""

from __future__ import annotations

import argparse
import array
import bisect
import ctypes
import errno
import json
import mmap
import os
import select
import socket
import struct
import sys

if __package__ in (None, ""):   # started by path (pyvmm does, to skip importing the snapshot package)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from pyvmm.host.streams import listen_unix  # noqa: E402
from pyvmm.memory import userfaultfd as uffd  # noqa: E402

PAGE = mmap.PAGESIZE
BLOCK = 64 << 10                  # a fault brings in the data of its 64 KiB block
PREFETCH_STEP = 1 << 20           # prefetch between two looks at the fault queue
_MESSAGE = struct.Struct("<B3xI QQ 8x")   # uffd_msg: event, ..., pagefault.flags, pagefault.address
assert _MESSAGE.size == 32
UFFD_EVENT_PAGEFAULT = 0x12


class Mapping:
    def __init__(self, base: int, size: int, offset: int) -> None:
        self.base, self.size, self.offset = base, size, offset
        self.present = bytearray(size // PAGE)


class Handler:
    def __init__(self, userfault: int, memory: int, mappings: list[Mapping], control: socket.socket, *,
                 prefetch: bool = True) -> None:
        self.fd, self.control, self.mappings = userfault, control, mappings
        self.prefetching = prefetch
        size = os.fstat(memory).st_size
        # private and writable only so that ctypes can take its address: nothing writes it
        self.file = mmap.mmap(memory, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self.file)
        self.file_address = ctypes.addressof(self._anchor)
        self.data = _data_ranges(memory, size)      # [(start, end)] of the file, ascending
        self.starts = [start for start, _ in self.data]
        self.todo = [(m, start, end) for m in mappings for start, end in self._data_in(m)]
        self.faults = 0

    def _data_in(self, mapping: Mapping) -> list[tuple[int, int]]:
        """The file's data ranges inside `mapping`, as offsets into the mapping."""
        low, high = mapping.offset, mapping.offset + mapping.size
        return [(max(s, low) - low, min(e, high) - low) for s, e in self.data if s < high and e > low]

    def _is_data(self, file_offset: int) -> bool:
        i = bisect.bisect_right(self.starts, file_offset) - 1
        return i >= 0 and self.data[i][1] > file_offset

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self.control, select.POLLIN)
        told = False
        while True:
            if not self.todo and not told:
                # Every data page is in: pyvmm now unregisters RAM and closes the socket. Until
                # then (or for a VMM that does not, like Firecracker) faults on holes still come.
                self.control.sendall(b"complete\n")
                told = True
            for fd, _ in poller.poll(0 if self.todo and self.prefetching else None):
                if fd == self.fd:
                    self._serve_faults()
                elif not self._control():
                    return
            if self.todo and self.prefetching:
                self._prefetch()

    def _control(self) -> bool:
        data = self.control.recv(64)
        if b"populate" in data:
            self.prefetching = True
        return bool(data)

    def _serve_faults(self) -> None:
        while True:
            try:
                data = os.read(self.fd, _MESSAGE.size * 64)
            except BlockingIOError:
                return
            for event, _, _flags, address in _MESSAGE.iter_unpack(data):
                if event == UFFD_EVENT_PAGEFAULT:
                    self.faults += 1
                    self._fault(address & ~(PAGE - 1))

    def _mapping(self, address: int) -> Mapping:
        for mapping in self.mappings:
            if mapping.base <= address < mapping.base + mapping.size:
                return mapping
        raise ValueError(f"fault at {address:#x} outside guest RAM")

    def _fault(self, address: int) -> None:
        mapping = self._mapping(address)
        page = (address - mapping.base) // PAGE
        if mapping.present[page]:
            uffd.wake(self.fd, address, PAGE)      # answered meanwhile (prefetch): wake the thread
            return
        if not self._is_data(mapping.offset + page * PAGE):
            self._zero(mapping, page)
            return
        first = page - page % (BLOCK // PAGE)
        last = min(first + BLOCK // PAGE, len(mapping.present))
        start = page
        while start > first and not mapping.present[start - 1] and self._is_data(mapping.offset + (start - 1) * PAGE):
            start -= 1
        end = page + 1
        while end < last and not mapping.present[end] and self._is_data(mapping.offset + end * PAGE):
            end += 1
        self._copy(mapping, start, end)

    def _copy(self, mapping: Mapping, start: int, end: int) -> None:
        destination = mapping.base + start * PAGE
        try:
            uffd.copy(self.fd, destination, self.file_address + mapping.offset + start * PAGE, (end - start) * PAGE)
        except uffd.HostMemoryError as exc:
            if exc.errno != errno.EEXIST:
                raise
            if end - start > 1:   # some page of the run is there already: the others one by one
                for page in range(start, end):
                    self._copy(mapping, page, page + 1)
                return
            uffd.wake(self.fd, destination, PAGE)
        mapping.present[start:end] = b"\1" * (end - start)

    def _zero(self, mapping: Mapping, page: int) -> None:
        try:
            uffd.zero_page(self.fd, mapping.base + page * PAGE, PAGE)
        except uffd.HostMemoryError as exc:
            if exc.errno != errno.EEXIST:
                raise
            uffd.wake(self.fd, mapping.base + page * PAGE, PAGE)
        mapping.present[page] = 1

    def _prefetch(self) -> None:
        """Copy in the next stretch of file data not yet present."""
        budget = PREFETCH_STEP
        while self.todo and budget > 0:
            mapping, start, end = self.todo[0]
            step_end = min(end, start + budget)
            first, last = start // PAGE, step_end // PAGE
            page = first
            while page < last:
                if mapping.present[page]:
                    page += 1
                    continue
                run = page
                while run < last and not mapping.present[run]:
                    run += 1
                self._copy(mapping, page, run)
                page = run
            budget -= step_end - start
            if step_end >= end:
                self.todo.pop(0)
            else:
                self.todo[0] = (mapping, step_end, end)


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    ranges, position = [], 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end))
        position = end
    return ranges


def receive(control: socket.socket, mem_file: str | None) -> tuple[int, int, list[Mapping]]:
    """The VMM's one message: (userfaultfd, memory file fd, mappings)."""
    fds = array.array("i")
    message, ancillary, _, _ = control.recvmsg(1 << 16, socket.CMSG_SPACE(2 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not fds:
        raise SystemExit("uffd handler: the message carried no userfaultfd")
    if len(fds) > 1:
        memory = fds[1]
    elif mem_file is not None:
        memory = os.open(mem_file, os.O_RDONLY | os.O_CLOEXEC)
    else:
        raise SystemExit("uffd handler: no memory file (give --mem-file)")
    mappings = [Mapping(int(m["base_host_virt_addr"]), int(m["size"]), int(m["offset"])) for m in json.loads(message)]
    return fds[0], memory, mappings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyvmm-uffd-handler", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="a connected Unix socket inherited from pyvmm")
    where.add_argument("--socket", help="listen here for one VMM (Firecracker's mem_backend Uffd)")
    parser.add_argument("--mem-file", help="the memory file (when the VMM does not send its fd)")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="load only what is touched (until the VMM asks for the rest)")
    args = parser.parse_args(argv)
    if args.fd is not None:
        control = socket.socket(fileno=args.fd)
    else:
        try:
            listener = listen_unix(args.socket, blocking=True)  # the path appears once it listens
        except OSError as exc:
            print(f"pyvmm-uffd-handler: {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
        control, _ = listener.accept()
        listener.close()
    try:
        fd, memory, mappings = receive(control, args.mem_file)
        os.set_blocking(fd, False)
        Handler(fd, memory, mappings, control, prefetch=not args.no_prefetch).run()
    except (OSError, ValueError) as exc:
        print(f"pyvmm uffd handler: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
