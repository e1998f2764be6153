"""Round trips of virtio device states driven by arbitrary driver traffic: whatever state the
device reaches, save -> JSON -> restore into a fresh device -> save gives the same state."""

from __future__ import annotations

import os
import struct
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.state import through_json
from helpers.virtio_driver import FakeDriver
from pyvmm.devices.virtio.blk import VirtioBlock
from pyvmm.devices.virtio.console import VirtioConsole
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SECTORS = 64


def fresh_like(device_factory, driver, memory, state):
    clone = device_factory()
    clone.attach(memory, driver.interrupts)
    clone.restore(through_json(state))
    return clone


blk_request = st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, SECTORS + 4),
                        st.integers(0, 3), st.booleans())


@SETTINGS
@given(requests=st.lists(blk_request, max_size=12), writeback=st.sampled_from([None, 0, 1]))
def test_any_blk_state_round_trips(requests, writeback):
    with tempfile.TemporaryDirectory() as tmp, GuestMemory.from_specs([RegionSpec(0, 4 << 20)]) as memory:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.write(bytes(SECTORS * 512))
        device = VirtioBlock(image, queue_size=64)
        driver = FakeDriver(memory, device, queue_size=64)
        queue = driver.queue(0)
        if writeback is not None:
            device.write_config(32, bytes([writeback]))
        for kind, sector, count, kick in requests:
            readable = [struct.pack("<IIQ", kind, 0, sector)]
            if kind == 1:
                readable.append(bytes(512 * count))
            queue.add(readable, [512 * count, 1] if kind == 0 else [1])
            if kick:
                device.notify(0)
            queue.take_used()
        state = device.save()
        device.close()
        clone = fresh_like(lambda: VirtioBlock(image, queue_size=64), driver, memory, state)
        try:
            assert clone.save() == state
            head = queue.add([struct.pack("<IIQ", 0, 0, 0)], [512, 1])   # the clone serves what follows
            clone.notify(0)
            assert head in [h for h, _ in queue.take_used()]
        finally:
            clone.close()


@SETTINGS
@given(inputs=st.lists(st.binary(max_size=40), max_size=8), cols=st.integers(0, 300), rows=st.integers(0, 100))
def test_any_console_state_round_trips(inputs, cols, rows):
    with GuestMemory.from_specs([RegionSpec(0, 4 << 20)]) as memory:
        out: list[bytes] = []
        device = VirtioConsole(out.append, cols=cols, rows=rows)
        driver = FakeDriver(memory, device, queue_size=16)
        for data in inputs:
            device.console_input(data)
        state = device.save()
        clone = fresh_like(lambda: VirtioConsole(out.append, cols=cols, rows=rows), driver, memory, state)
        assert clone.save() == state


@SETTINGS
@given(requests=st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=3), max_size=10))
def test_any_rng_state_round_trips(requests):
    with GuestMemory.from_specs([RegionSpec(0, 4 << 20)]) as memory:
        device = VirtioRng(source=lambda n: bytes(n))
        driver = FakeDriver(memory, device, queue_size=16)
        queue = driver.queue(0)
        for sizes in requests:
            queue.add([], sizes)
            device.notify(0)
        state = device.save()
        clone = fresh_like(lambda: VirtioRng(source=lambda n: bytes(n)), driver, memory, state)
        assert clone.save() == state
