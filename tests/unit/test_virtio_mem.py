"""The virtio-mem device model (devices/virtio/mem.py) against the fake virtio driver: the
configuration the driver reads, plug/unplug/state requests and their answers, unplugged blocks
discarded on the host, the requested size announced by a config interrupt, and its state."""

from __future__ import annotations

import struct

import pytest

from helpers.virtio_driver import FakeDriver, Interrupts
from pyvmm.devices.virtio.mem import (
    REQ_PLUG, REQ_STATE, REQ_UNPLUG, REQ_UNPLUG_ALL, RESP_ACK, RESP_ERROR, RESP_NACK, STATE_MIXED, STATE_PLUGGED,
    STATE_UNPLUGGED, VirtioMem, VirtioMemState,
)
from pyvmm.memory import GuestMemory
from pyvmm.memory.guest_memory import RegionSpec
from pyvmm.persist import StateError

MiB = 1 << 20
BASE, REGION, BLOCK = 64 * MiB, 16 * MiB, 2 * MiB


@pytest.fixture
def setup():
    with GuestMemory.from_specs([RegionSpec(0, 4 * MiB), RegionSpec(BASE, REGION)]) as memory:
        device = VirtioMem(BASE, REGION, BLOCK)
        driver = FakeDriver(memory, device, queue_size=8)
        yield memory, device, driver


def request(device, driver, kind: int, address: int = 0, blocks: int = 0) -> tuple[int, int]:
    queue = driver.queue(0)
    head = queue.add([struct.pack("<H6xQH6x", kind, address, blocks)], [10])
    device.notify(0)
    [(done, written)] = queue.take_used()
    assert done == head and written == 10
    return struct.unpack("<H6xH", queue.written(head)[:10])


def config(device) -> tuple[int, ...]:
    return struct.unpack("<QH6xQQQQQ", device.read_config(0, 56))


def test_the_config_the_driver_reads_and_a_requested_size_change(setup):
    memory, device, driver = setup
    assert config(device) == (BLOCK, 0, BASE, REGION, REGION, 0, 0)
    before = driver.interrupts.config
    device.set_requested_size(6 * MiB)
    assert driver.interrupts.config == before + 1 and config(device)[6] == 6 * MiB
    for bad in (-BLOCK, REGION + BLOCK, MiB):
        with pytest.raises(ValueError):
            device.set_requested_size(bad)


def test_plug_up_to_the_requested_size_then_nack(setup):
    memory, device, driver = setup
    device.set_requested_size(4 * MiB)
    assert request(device, driver, REQ_PLUG, BASE, 2) == (RESP_ACK, 0)
    assert config(device)[5] == 4 * MiB  # plugged_size
    assert request(device, driver, REQ_PLUG, BASE + 4 * MiB, 1) == (RESP_NACK, 0)  # beyond the request
    assert request(device, driver, REQ_STATE, BASE, 2) == (RESP_ACK, STATE_PLUGGED)
    assert request(device, driver, REQ_STATE, BASE + 2 * MiB, 2) == (RESP_ACK, STATE_MIXED)
    assert request(device, driver, REQ_STATE, BASE + 4 * MiB, 6) == (RESP_ACK, STATE_UNPLUGGED)
    assert device.stats()["nacks"] == 1


@pytest.mark.parametrize("kind,address,blocks", [
    (REQ_PLUG, BASE + MiB, 1),                 # not block-aligned
    (REQ_PLUG, BASE - BLOCK, 1),               # before the region
    (REQ_PLUG, BASE + REGION - BLOCK, 2),      # past its end
    (REQ_PLUG, BASE, 0),                       # no blocks
    (REQ_UNPLUG, BASE, 1),                     # not plugged
    (REQ_STATE, BASE + REGION, 1),
    (7, BASE, 1),                              # no such request
])
def test_bad_requests_are_errors(setup, kind, address, blocks):
    memory, device, driver = setup
    device.set_requested_size(REGION)
    assert request(device, driver, kind, address, blocks) == (RESP_ERROR, 0)
    assert device.plugged_size == 0 and device.stats()["errors"] == 1


def test_plugging_a_plugged_block_is_an_error(setup):
    memory, device, driver = setup
    device.set_requested_size(REGION)
    assert request(device, driver, REQ_PLUG, BASE, 1)[0] == RESP_ACK
    assert request(device, driver, REQ_PLUG, BASE, 2)[0] == RESP_ERROR
    assert device.plugged_size == BLOCK


def test_unplugged_blocks_are_discarded_on_the_host(setup):
    memory, device, driver = setup
    device.set_requested_size(REGION)
    assert request(device, driver, REQ_PLUG, BASE, 3)[0] == RESP_ACK
    region = memory.region_for(BASE)
    memory.fill(BASE, 3 * BLOCK, 0xAB)  # the guest uses its new memory
    assert region.resident_bytes() == 3 * BLOCK
    assert request(device, driver, REQ_UNPLUG, BASE + BLOCK, 1)[0] == RESP_ACK
    assert region.resident_bytes() == 2 * BLOCK
    assert memory.read(BASE + BLOCK, 16) == bytes(16) and memory.read(BASE, 1) == b"\xab"
    assert request(device, driver, REQ_UNPLUG_ALL)[0] == RESP_ACK
    assert region.resident_bytes() == 0 and device.plugged_size == 0
    assert device.stats()["unplugged_blocks"] == 3


def test_the_state_carries_the_plugged_blocks(setup):
    memory, device, driver = setup
    device.set_requested_size(8 * MiB)
    request(device, driver, REQ_PLUG, BASE + 2 * BLOCK, 2)
    state = device.save()
    assert VirtioMemState.from_dict(state.to_dict()) == state
    other = VirtioMem(BASE, REGION, BLOCK)
    other.attach(memory, Interrupts())
    other.restore(state)
    assert other.status() == device.status() and other.plugged == device.plugged
    with pytest.raises(ValueError, match="this device's is"):
        VirtioMem(BASE, 2 * REGION, BLOCK).restore(state)
    broken = state.to_dict()
    broken["fields"]["plugged"] = broken["fields"]["plugged"][:4]
    with pytest.raises(StateError, match="plugged: must hold one byte per block"):
        VirtioMemState.from_dict(broken)


def test_the_machine_option_its_checks_and_where_the_region_sits():
    from pyvmm.api.schema import VmSpec
    from pyvmm.arch.x86_64 import layout
    from pyvmm.config import ConfigError, MachineConfig
    from pyvmm.vm_state import MachineDescription

    machine = MachineConfig(memory=256 * MiB, virtio_mem_size=512 * MiB)
    machine.validate()
    region = layout.virtio_mem_region(256 * MiB, 512 * MiB)
    pci_base, pci_size = layout.pci_mmio64_window(256 * MiB)
    assert region.guest_base == pci_base + pci_size and region.guest_base % (1 << 30) == 0
    assert [(s.guest_base, s.size) for s in layout.memory_specs(256 * MiB, 512 * MiB)] == \
        [(0, 256 * MiB), (region.guest_base, 512 * MiB)]
    for size in (100 * MiB, -128 * MiB, 2 << 40):
        with pytest.raises(ConfigError) as error:
            MachineConfig(memory=256 * MiB, virtio_mem_size=size).validate()
        assert error.value.field == "virtio_mem_size" and "multiple of 128M up to 1024G" in error.value.detail
    description = MachineDescription.from_config(machine)
    assert MachineDescription.from_dict(description.to_dict()).to_config() == machine
    old = description.to_dict()
    old["version"] = 3
    del old["fields"]["virtio_mem_size"], old["fields"]["virtio_mem_transport"]
    assert MachineDescription.from_dict(old).to_config().virtio_mem_size == 0
    spec = VmSpec.from_document({"machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
                                 "pyvmm": {"virtio_mem_mib": 1024, "transport": "mmio"}})
    built, _ = spec.machine_config()
    assert (built.virtio_mem_size, built.virtio_mem_transport) == (1 << 30, "mmio")
    with pytest.raises(ConfigError) as error:
        VmSpec.from_document({"machine-config": {"vcpu_count": 1, "mem_size_mib": 256}, "pyvmm": {"virtio_mem_mib": 100}})
    assert str(error.value).startswith("pyvmm.virtio_mem_mib: must be a multiple of 128M")


def test_guest_memory_size_is_its_ram_not_the_device_region():
    with GuestMemory.from_specs([RegionSpec(0, 4 * MiB), RegionSpec(BASE, REGION)]) as memory:
        assert memory.size == 4 * MiB + REGION
        memory.ram_size = 4 * MiB
        assert memory.size == 4 * MiB and memory.contains(BASE, REGION)
