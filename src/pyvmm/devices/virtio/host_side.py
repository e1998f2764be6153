"""What a device model sees of its host side: byte streams, listeners, threads that move data.

The objects behind these protocols live in pyvmm.host (Unix sockets, the I/O thread that
watches them); the builder makes them and hands them to the device. Every callback runs on
the I/O thread; the device takes its own lock in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from ...memory.guest_memory import GuestMemory


class HostStream(Protocol):
    """A byte stream to a program on the host."""

    def recv(self, limit: int) -> bytes | None:
        """Up to `limit` bytes; None when none are there now, b"" when the host closed its end.
        Raises OSError when the stream broke."""

    def send(self, data: bytes | bytearray) -> int | None:
        """How many bytes the host took; None when it can take none now. Raises OSError when broken."""

    def shutdown_write(self) -> None:
        """No more bytes to the host (it reads end-of-file)."""

    def watch_readable(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever there is something to recv, until unwatch_readable()."""

    def unwatch_readable(self) -> None: ...

    def watch_writable(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the host can take bytes again (one-shot)."""

    def close(self) -> None:
        """Forget every watch and close (the I/O thread lets go first)."""


class StreamListener(Protocol):
    """Where host programs connect to one endpoint (a console port)."""

    def start_accepting(self, on_client: Callable[[HostStream], None]) -> None:
        """Hand each new client to `on_client`, until stop_accepting()."""

    def stop_accepting(self) -> None: ...

    def close(self) -> None:
        """Stop accepting and remove the endpoint."""


class VsockHost(Protocol):
    """The host side of a vsock device: connections to host ports, and host programs that ask
    for guest ports. It also keeps the streams of live connections by (guest port, host port),
    so a device restored in the same process takes them over."""

    def connect(self, host_port: int) -> HostStream:
        """A stream to whatever serves `host_port`; OSError when nobody does."""

    def start(self, on_request: Callable[[int, HostStream, bytes], bool]) -> None:
        """Call on_request(guest port, stream, bytes the client sent after its request) for every
        host program that asks for a guest port; False refuses it (the stream is closed)."""

    def accepted(self, stream: HostStream, local_port: int) -> None:
        """The guest accepted a host program's request from `local_port`: tell the program."""

    def adopt(self, key: tuple[int, int], stream: HostStream) -> None:
        """Remember the stream of a live connection."""

    def release(self, key: tuple[int, int]) -> None:
        """The connection ended: forget (not close) its stream."""

    def reclaim(self, key: tuple[int, int]) -> HostStream | None:
        """The stream of a connection a restored device continues, if the host still has it."""

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None:
        """Close every stream and the listener, remove the socket file."""


class DiskTransfers(Protocol):
    """Threads that move a disk request's data between its image and guest RAM while the
    device's own thread serves on (host/disk_transfers.py)."""

    def start(self, finished: Callable[[list[tuple[object, int]]], None], item: object, writing: bool, fd: int,
              offset: int, memory: GuestMemory, pieces: list[tuple[int, int]], skip: int, length: int) -> None:
        """Move bytes [skip, skip + length) of `pieces` (guest address, size; each inside one of
        RAM's regions) between guest RAM and `fd` at `offset`: every byte, RAM's mappings held
        until then. `finished([(item, errno or 0), ...])` is called later on the I/O thread with
        the device's transfers that ended by then, `item` being this one's."""

    def wait_idle(self) -> None:
        """Return once no transfer started so far moves data (`finished` may come later)."""
