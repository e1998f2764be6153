"""virtio-console (virtio 1.2 section 5.3) with VIRTIO_CONSOLE_F_MULTIPORT.

Port 0 is the guest's console (hvc0): its output goes to the same `console_write` the
UART uses, host input arrives through `console_input()` (or the UART-like
`receive`/`rx_space`/`wait_rx_space`, so the terminal code can attach to either).
Every other port has a name (the guest sees /dev/vportNpM and
/sys/class/virtio-ports/vportNpM/name) and a host end: a StreamListener (host_side.py;
pyvmm's is a Unix socket, host/console.py) that hands over one client stream at a time.

Queues: 0/1 port 0 receive/transmit, 2/3 control receive/transmit, then a
receive/transmit pair per extra port. The bring-up, as Linux drives it:

    driver DEVICE_READY            -> device PORT_ADD for every port
    driver PORT_READY(id)          -> device CONSOLE_PORT (port 0), PORT_NAME, PORT_OPEN if a host end is there
    driver PORT_OPEN(id, 1 / 0)    a guest process opened or closed the port (hvc opens port 0)
    device PORT_OPEN(id, 1 / 0)    a host client connected or went away

Host bytes go to a port's receive queue only while the guest has the port open (Linux
throws away data for a closed port); until then they wait in a bounded buffer. A host
client is simply not read while that buffer is full; console input beyond it is dropped
and counted. Guest bytes for a slow client wait in a bounded buffer too, after which
the guest's transmit queue is left alone until the client reads.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from ...persist import State, require
from .device import VIRTIO_ID_CONSOLE, VirtioDevice, VirtioDeviceState
from .host_side import HostStream, StreamListener
from .queue import read_buffers, write_buffers

log = logging.getLogger(__name__)

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2

# Control events (section 5.3.6.2)
DEVICE_READY, PORT_ADD, PORT_REMOVE, PORT_READY, CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME = range(8)
BAD_ID = 0xFFFFFFFF

CONTROL_RX, CONTROL_TX = 2, 3
CONTROL = struct.Struct("<IHH")
_CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

PENDING_LIMIT = 64 << 10    # host -> guest bytes held per port while the guest cannot take them
OUTPUT_LIMIT = 64 << 10     # guest -> client bytes held per port before the guest is held back
CONTROL_LIMIT = 1024        # control messages waiting for control receive buffers
READ_CHUNK = 16 << 10
MAX_PORTS = 31
MAX_NAME = 255


class ConsolePort:
    """One port: its queues, its host end, what waits in either direction, its counters."""

    def __init__(self, port_id: int, name: str | None, listener: StreamListener | None) -> None:
        self.id, self.name, self.listener = port_id, name, listener
        self.rx_queue = 0 if port_id == 0 else 2 * (port_id + 1)
        self.tx_queue = self.rx_queue + 1
        self.client: HostStream | None = None
        self.reading = False           # watching the client for bytes
        self.ready = False             # the driver sent PORT_READY
        self.guest_open = False        # a guest process has the port open
        self.announced_open = False    # what the guest was last told about the host end
        self.pending = bytearray()     # host -> guest
        self.output = bytearray()      # guest -> client
        self.rx_bytes = self.tx_bytes = self.rx_dropped = self.tx_dropped = self.connections = 0

    @property
    def host_open(self) -> bool:
        return self.id == 0 or self.client is not None

    def counters(self) -> dict:
        return {"rx_bytes": self.rx_bytes, "tx_bytes": self.tx_bytes, "rx_dropped": self.rx_dropped,
                "tx_dropped": self.tx_dropped, "pending": len(self.pending), "connections": self.connections,
                "guest_open": self.guest_open, "host_open": self.host_open}


class VirtioConsole(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(self, console_write: Callable[[bytes], None], *,
                 ports: dict[str, StreamListener] | None = None, queue_size: int = 256,
                 cols: int = 0, rows: int = 0) -> None:
        ports = dict(ports or {})
        if len(ports) > MAX_PORTS:
            raise ValueError(f"virtio-console: at most {MAX_PORTS} named ports (got {len(ports)})")
        for name in ports:
            if not name or len(name) > MAX_NAME or not name.isprintable() or "/" in name:
                raise ValueError(f"virtio-console: bad port name {name!r}")
        features = VIRTIO_CONSOLE_F_MULTIPORT | VIRTIO_CONSOLE_F_EMERG_WRITE
        if cols and rows:
            features |= VIRTIO_CONSOLE_F_SIZE
        super().__init__((queue_size,) * (2 * (len(ports) + 2)), features)
        self.console_write = console_write
        self.cols, self.rows = cols, rows
        self.ports = [ConsolePort(0, None, None)] + [
            ConsolePort(i, name, listener) for i, (name, listener) in enumerate(ports.items(), 1)]
        self._control: collections.deque[bytes] = collections.deque()
        self._space = threading.Condition(self.lock)
        self.control_dropped = 0
        self.control_malformed = 0
        for port in self.ports[1:]:
            self._accept_more(port)

    @property
    def max_nr_ports(self) -> int:
        return len(self.ports)

    def _multiport(self) -> bool:
        return self.has_feature(VIRTIO_CONSOLE_F_MULTIPORT)

    # --- configuration --------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.cols, self.rows, self.max_nr_ports, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR_OFFSET and data and self.has_feature(VIRTIO_CONSOLE_F_EMERG_WRITE):
            with self.lock:
                self.ports[0].tx_bytes += 1
                self.console_write(data[:1])  # emergency write: one character, no queue needed
            return
        super().write_config(offset, data)

    def resize(self, cols: int, rows: int) -> None:
        """The host terminal changed size (read by drivers without MULTIPORT; Linux with it keeps 80x25)."""
        with self.lock:
            self.cols, self.rows = cols & 0xFFFF, rows & 0xFFFF
            if self.active and self.has_feature(VIRTIO_CONSOLE_F_SIZE):
                self.config_changed()

    # --- host input for port 0 --------------------------------------------------------------------

    def console_input(self, data: bytes) -> int:
        """Queue terminal input for hvc0; returns how many bytes were kept (the rest is dropped and counted)."""
        with self.host_work():
            port = self.ports[0]
            take = min(len(data), PENDING_LIMIT - len(port.pending))
            port.pending += data[:take]
            port.rx_dropped += len(data) - take
            self._deliver(port)
            return take

    receive = console_input  # the UART's name, so Console.attach() takes either device

    def rx_space(self) -> int:
        with self.lock:
            return PENDING_LIMIT - len(self.ports[0].pending)

    def wait_rx_space(self, timeout: float | None = None) -> int:
        with self._space:
            self._space.wait_for(lambda: len(self.ports[0].pending) < PENDING_LIMIT, timeout)
            return PENDING_LIMIT - len(self.ports[0].pending)

    # --- lifecycle ----------------------------------------------------------------------------------

    def on_activate(self) -> None:
        if not self._multiport():
            self.ports[0].guest_open = True  # no control queue: port 0 is simply there

    def on_reset(self) -> None:
        self._control.clear()
        for port in self.ports:
            port.ready = port.guest_open = port.announced_open = False

    def close(self) -> None:
        """Drop the clients, close the ports' host sides (idempotent)."""
        with self.lock:
            for port in self.ports[1:]:
                self._drop_client(port, announce=False)
                if port.listener is not None:
                    port.listener.close()
                    port.listener = None

    # --- queues -----------------------------------------------------------------------------------------

    def process_queue(self, queue_index: int) -> None:
        if queue_index == CONTROL_RX:
            self._flush_control()
        elif queue_index == CONTROL_TX:
            self._receive_control()
        else:
            port_id = 0 if queue_index < 2 else queue_index // 2 - 1
            port = self.ports[port_id]
            if queue_index == port.rx_queue:
                self._deliver(port)
            else:
                self._transmit(port)

    def _deliver(self, port: ConsolePort) -> None:
        """Move waiting host bytes into the port's receive buffers, as far as they go."""
        if not port.pending or not port.guest_open or not self.queue_usable(port.rx_queue):
            return
        queue = self.queues[port.rx_queue]
        moved = False
        while port.pending and (chain := queue.pop()) is not None:
            written = write_buffers(self.memory, chain.writable, bytes(port.pending[:chain.writable_length]))
            del port.pending[:written]
            port.rx_bytes += written
            queue.push(chain, written)
            moved = True
        if moved:
            self.signal_used(port.rx_queue)
            if port.id == 0:
                self._space.notify_all()
            else:
                self._read_more(port)

    def _transmit(self, port: ConsolePort) -> None:
        queue = self.queues[port.tx_queue]
        served = False
        while len(port.output) < OUTPUT_LIMIT and (chain := queue.pop()) is not None:
            data = read_buffers(self.memory, chain.readable)
            queue.push(chain, 0)
            served = True
            if port.id == 0:
                port.tx_bytes += len(data)
                self.console_write(data)
            elif port.client is not None:
                port.tx_bytes += len(data)
                port.output += data
                self._flush_output(port)
            else:
                port.tx_dropped += len(data)  # nobody listens (Linux holds writes until PORT_OPEN anyway)
        if served:
            self.signal_used(port.tx_queue)

    # --- control queue --------------------------------------------------------------------------------

    def _send_control(self, port_id: int, event: int, value: int, payload: bytes = b"") -> None:
        if not self._multiport():
            return
        if len(self._control) >= CONTROL_LIMIT:
            self.control_dropped += 1
            log.warning("virtio-console: control queue full, event %d for port %d dropped", event, port_id)
            return
        self._control.append(CONTROL.pack(port_id, event, value) + payload)
        self._flush_control()

    def _flush_control(self) -> None:
        if not self._control or not self.queue_usable(CONTROL_RX):
            return
        queue = self.queues[CONTROL_RX]
        moved = False
        while self._control and (chain := queue.pop()) is not None:
            message = self._control.popleft()
            queue.push(chain, write_buffers(self.memory, chain.writable, message))
            moved = True
        if moved:
            self.signal_used(CONTROL_RX)

    def _receive_control(self) -> None:
        queue = self.queues[CONTROL_TX]
        served = False
        while (chain := queue.pop()) is not None:
            message = read_buffers(self.memory, chain.readable, 0, CONTROL.size)
            queue.push(chain, 0)
            served = True
            if len(message) < CONTROL.size:
                self.control_malformed += 1
                continue
            self._on_control(*CONTROL.unpack(message))
        if served:
            self.signal_used(CONTROL_TX)

    def _on_control(self, port_id: int, event: int, value: int) -> None:
        if event == DEVICE_READY:
            if not value:
                log.warning("virtio-console: the driver failed to set up the device")
                return
            for port in self.ports:
                self._send_control(port.id, PORT_ADD, 1)
            return
        if port_id >= len(self.ports) or event not in (PORT_READY, PORT_OPEN):
            self.control_malformed += 1
            log.debug("virtio-console: ignored control event %d for port %d", event, port_id)
            return
        port = self.ports[port_id]
        if event == PORT_READY:
            port.ready = bool(value)
            if not value:
                log.warning("virtio-console: the driver failed to add port %d", port_id)
                return
            if port.id == 0:
                self._send_control(0, CONSOLE_PORT, 1)
            if port.name:
                self._send_control(port.id, PORT_NAME, 1, port.name.encode())
            self._announce(port)
        else:
            port.guest_open = bool(value)
            self._deliver(port)
            if port.id and port.guest_open:
                self._read_more(port)

    def _announce(self, port: ConsolePort) -> None:
        """Tell a ready guest whether the host end of `port` is there, when that changed."""
        if port.ready and port.announced_open != port.host_open:
            port.announced_open = port.host_open
            self._send_control(port.id, PORT_OPEN, int(port.host_open))

    # --- named ports' host ends (callbacks run on the I/O thread) ------------------------------------------------

    def _accept_more(self, port: ConsolePort) -> None:
        if port.listener is not None:
            port.listener.start_accepting(lambda stream: self._on_client(port, stream))

    def _stop_accepting(self, port: ConsolePort) -> None:
        if port.listener is not None:
            port.listener.stop_accepting()

    def _on_client(self, port: ConsolePort, client: HostStream) -> None:
        with self.host_work():
            if port.listener is None or port.client is not None:
                client.close()
                return
            port.client = client
            port.connections += 1
            self._stop_accepting(port)  # one client at a time; the next one waits in the backlog
            self._read_more(port)
            self._announce(port)

    def _read_more(self, port: ConsolePort) -> None:
        """Watch the client while there is room for what it sends."""
        client = port.client
        want = client is not None and len(port.pending) < PENDING_LIMIT
        if want and not port.reading:
            assert client is not None
            port.reading = True
            client.watch_readable(lambda: self._on_readable(port, client))
        elif not want and port.reading:
            assert client is not None  # reading only while connected (_drop_client clears it)
            port.reading = False
            client.unwatch_readable()

    def _on_readable(self, port: ConsolePort, client: HostStream) -> None:
        with self.host_work():
            if port.client is not client:
                return
            room = PENDING_LIMIT - len(port.pending)
            if room <= 0:
                self._read_more(port)
                return
            try:
                data = client.recv(min(room, READ_CHUNK))
            except OSError:
                data = b""
            if data is None:
                return
            if not data:
                self._drop_client(port)
                return
            port.pending += data
            self._deliver(port)
            self._read_more(port)

    def _flush_output(self, port: ConsolePort) -> None:
        client = port.client
        assert client is not None  # called with a client connected
        while port.output:
            try:
                sent = client.send(port.output)
            except OSError:
                self._drop_client(port)
                return
            if sent is None:
                client.watch_writable(lambda: self._on_writable(port, client))
                return
            del port.output[:sent]

    def _on_writable(self, port: ConsolePort, client: HostStream) -> None:
        with self.host_work():
            if port.client is not client:
                return
            self._flush_output(port)
            if port.client is client and len(port.output) < OUTPUT_LIMIT and self.queue_usable(port.tx_queue):
                self._transmit(port)  # chains left alone while the client was behind

    def _drop_client(self, port: ConsolePort, announce: bool = True) -> None:
        """The client went away (or pyvmm closes): tell the guest, take the next client.
        Bytes it sent that the guest has not taken yet are still delivered."""
        client = port.client
        if client is None:
            return
        port.reading = False
        client.close()     # forgets its watches too
        port.client = None
        port.tx_dropped += len(port.output)
        port.output.clear()
        if announce:
            self._announce(port)
            self._accept_more(port)

    # --- counters and snapshot -------------------------------------------------------------------------------

    def counters(self) -> dict:
        with self.lock:
            return {"control_dropped": self.control_dropped, "control_malformed": self.control_malformed,
                    "ports": {port.name or "console": port.counters() for port in self.ports}}

    def save(self) -> ConsoleState:
        """Requests are served whole under the device lock: none is in flight at a save. Bytes
        waiting for a host client are not saved (counted as dropped: the client does not survive a restore)."""
        with self.lock:
            return ConsoleState(
                virtio=self.save_virtio(), cols=self.cols, rows=self.rows, control=tuple(self._control),
                control_dropped=self.control_dropped, control_malformed=self.control_malformed,
                ports=tuple(ConsolePortState(
                    name=port.name, ready=port.ready, guest_open=port.guest_open,
                    announced_open=port.announced_open, pending=bytes(port.pending),
                    counters=(port.rx_bytes, port.tx_bytes, port.rx_dropped, port.tx_dropped + len(port.output),
                              port.connections)) for port in self.ports))

    def check_restorable(self, state: State) -> None:
        state = require(state, ConsoleState)
        if [p.name for p in state.ports] != [port.name for port in self.ports]:
            state.fail("ports", f"named {[p.name for p in state.ports]}, this device has "
                                f"{[port.name for port in self.ports]}")
        self.check_virtio(state.virtio)

    def restore(self, state: ConsoleState) -> None:  # type: ignore[override]
        """Load a `save()` result; host clients are not part of it, so the guest hears
        PORT_OPEN 0 for a port whose client is gone (and 1 for one connected since)."""
        self.check_restorable(state)
        with self.host_work():
            self.restore_virtio(state.virtio)
            self.cols, self.rows = state.cols, state.rows
            self._control = collections.deque(state.control)
            self.control_dropped, self.control_malformed = state.control_dropped, state.control_malformed
            for port, saved in zip(self.ports, state.ports):
                port.ready, port.guest_open, port.announced_open = saved.ready, saved.guest_open, saved.announced_open
                port.pending = bytearray(saved.pending)
                port.rx_bytes, port.tx_bytes, port.rx_dropped, port.tx_dropped, port.connections = saved.counters
            for port in self.ports:
                self._announce(port)
                self._deliver(port)
            self._flush_control()


@dataclass(frozen=True)
class ConsolePortState(State):
    """One port as the guest knows it, the host bytes it has not taken yet, and the counters
    (rx_bytes, tx_bytes, rx_dropped, tx_dropped, connections)."""
    KIND = "virtio_console_port"
    name: str | None
    ready: bool
    guest_open: bool
    announced_open: bool
    pending: bytes
    counters: tuple[int, int, int, int, int]

    def validate(self) -> None:
        if len(self.pending) > PENDING_LIMIT:
            self.fail("pending", f"{len(self.pending)} bytes, at most {PENDING_LIMIT}")
        self.check_items("counters", 0, 1 << 64)


@dataclass(frozen=True)
class ConsoleState(State):
    KIND = "virtio_console"
    virtio: VirtioDeviceState
    cols: int
    rows: int
    control: tuple[bytes, ...]   # control messages waiting for the driver's buffers
    control_dropped: int
    control_malformed: int
    ports: tuple[ConsolePortState, ...]

    def validate(self) -> None:
        self.check_range("cols", 0, 0xFFFF)
        self.check_range("rows", 0, 0xFFFF)
        if len(self.control) > CONTROL_LIMIT:
            self.fail("control", f"{len(self.control)} messages, at most {CONTROL_LIMIT}")
        for i, message in enumerate(self.control):
            if len(message) < CONTROL.size:
                self.fail(f"control[{i}]", f"{len(message)} bytes, a control message has {CONTROL.size}")
        self.check_range("control_dropped", 0, 1 << 64)
        self.check_range("control_malformed", 0, 1 << 64)
        if not self.ports or self.ports[0].name is not None:
            self.fail("ports", "port 0 (the console, unnamed) comes first")
