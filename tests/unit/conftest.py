"""Fixtures the device tests share."""

import shutil
import socket
import tempfile

import pytest

from pyvmm.iothread import IoThread


@pytest.fixture
def iothread():
    """A running I/O thread, stopped (and joined) after the test."""
    thread = IoThread(name="test-io")
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture
def wire():
    """A fake TAP for virtio-net: (device side, host side) of a SOCK_SEQPACKET pair, one frame per
    message; the host side times out after 5 s."""
    device_side, host_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host_side.settimeout(5)
    yield device_side, host_side
    device_side.close()
    host_side.close()


@pytest.fixture
def sockdir():
    """A short directory for Unix sockets (their paths are limited to 108 bytes)."""
    path = tempfile.mkdtemp(prefix="pyvmm-sock-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def translator():
    """The software CPU's engine on 8 MiB of guest RAM (no devices), closed after the test."""
    pytest.importorskip("unicorn")
    from pyvmm.accel.dispatch import ExitDispatcher
    from pyvmm.accel.tcg.engine_state import engine_offsets
    from pyvmm.accel.tcg.private_state import context_offsets
    from pyvmm.accel.tcg.slice_timer import SliceTimer
    from pyvmm.accel.tcg.translator import Translator
    from pyvmm.bus.bus import MmioBus, PioBus
    from pyvmm.memory.guest_memory import GuestMemory, RegionSpec

    memory = GuestMemory.from_specs([RegionSpec(0, 8 << 20)])
    timer = SliceTimer()
    engine = Translator(memory, ExitDispatcher(PioBus(), MmioBus()), context_offsets(), engine_offsets(), timer)
    yield engine
    engine.close()
    timer.close()
    memory.close()
