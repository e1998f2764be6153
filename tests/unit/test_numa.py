"""Guest NUMA topology (arch/x86_64/numa.py): the option's syntax and checks, RAM split across
nodes and the 32-bit hole, the SRAT and SLIT read back by ACPICA's iasl, the machine
description carrying the nodes, and the host binding (host/numa.py) on this host's node 0."""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import struct
import threading

import pytest

from helpers.acpica import disassemble_and_recompile
from pyvmm.api.schema import VmSpec
from pyvmm.arch.x86_64.acpi import layout_acpi_tables
from pyvmm.arch.x86_64.numa import NumaNode, build_slit, build_srat, node_ranges, numa_tables
from pyvmm.config import ConfigError, MachineConfig, parse_numa_node
from pyvmm.host.numa import bind_memory, host_nodes, pin_thread, plan
from pyvmm.persist import StateError
from pyvmm.vm_state import MachineDescription

GiB, MiB = 1 << 30, 1 << 20


def test_parse_the_option():
    assert parse_numa_node("cpus=0-2,5,mem=1G,distances=10:20") == NumaNode((0, 1, 2, 5), GiB, (10, 20))
    assert parse_numa_node("cpus=1;3,mem=64M,host_node=1") == NumaNode((1, 3), 64 * MiB, None, 1)
    assert parse_numa_node("mem=16M") == NumaNode((), 16 * MiB)  # memory only
    assert NumaNode((0, 1, 2, 5), GiB, (10, 20), 1).describe() == "cpus=0-2;5,mem=1024M,distances=10:20,host_node=1"


@pytest.mark.parametrize("text,message", [
    ("cpus=0", ": mem=SIZE is missing (in 'cpus=0')"),
    ("cpus=0,mem=1G,size=3", ": 'size=3' is not cpus=LIST, mem=SIZE, distances=D:D:... or host_node=N (in "
                             "'cpus=0,mem=1G,size=3')"),
    ("cpus=3-1,mem=1G", ": '3-1' is not a vCPU index or range like 0-3"),
    ("cpus=0,mem=1G,distances=10:x", ": distances must be numbers separated by ':' (got '10:x')"),
    ("cpus=0,mem=1G,host_node=a", ": host_node must be a host NUMA node number (got 'a')"),
])
def test_malformed_options_are_one_line(text, message):
    with pytest.raises(ConfigError) as error:
        parse_numa_node(text, "numa[0]")
    assert (error.value.field, error.value.detail) == ("numa[0]", message)


def _machine(*texts: str, cpus: int = 2, memory: int = 256 * MiB) -> MachineConfig:
    return MachineConfig(cpus=cpus, memory=memory, numa=tuple(parse_numa_node(t) for t in texts))


@pytest.mark.parametrize("texts,field,message", [
    (("cpus=0,mem=100M", "cpus=1,mem=100M"), "numa", ": the nodes' memory adds up to 200M, the machine has 256M"),
    (("cpus=0-2,mem=128M", "cpus=1,mem=128M"), "numa[0]", ": vCPU 2 is out of range: the machine has 2 vCPUs (0-1)"),
    (("cpus=0-1,mem=128M", "cpus=1,mem=128M"), "numa[1]", ": vCPU 1 is in node 0 already"),
    (("cpus=0,mem=256M",), "numa", ": vCPU 1 is in no node"),
    (("cpus=0,mem=254M", "cpus=1,mem=2M"), "numa[1]", ": mem must be a whole number of MiB, at least 4M "
                                                     "(got 2097152 bytes)"),
    (("cpus=0,mem=128M,distances=10", "cpus=1,mem=128M"), "numa[0]",
     ": distances must give one distance per node (2), got 1"),
    (("cpus=0,mem=128M,distances=12:20", "cpus=1,mem=128M"), "numa[0]",
     ": the distance of a node to itself must be 10 (got 12)"),
    (("cpus=0,mem=128M", "cpus=1,mem=128M,distances=10:10"), "numa[1]",
     ": the distance to node 0 must be 11-254 (got 10)"),
])
def test_topologies_that_do_not_fit_the_machine(texts, field, message):
    with pytest.raises(ConfigError) as error:
        _machine(*texts).validate()
    assert (error.value.field, error.value.detail) == (field, message)


def test_ram_goes_to_nodes_in_address_order_across_the_hole():
    nodes = (NumaNode((0,), 2 * GiB), NumaNode((1,), 2 * GiB))
    assert node_ranges(nodes, 4 * GiB) == [(0, 0, 2 * GiB), (1, 2 * GiB, GiB), (1, 4 * GiB, GiB)]


def _fields(dsl: str, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(field, value) of the disassembly's lines naming one of `names`, in table order."""
    pattern = re.compile(r"^\[[0-9A-F]+h \d+ +\d+\] +(.+?) : (\S+)", re.M)
    return [(name, value) for name, value in pattern.findall(dsl) if name in names]


def test_srat_and_slit_read_back_by_iasl(tmp_path):
    nodes = (NumaNode((0, 1), 3 * GiB + 512 * MiB), NumaNode((2,), 512 * MiB, (30, 10)))
    srat = build_srat(nodes, 4 * GiB)
    recompiled = disassemble_and_recompile(srat, b"SRAT", ["[Processor Local APIC/SAPIC Affinity]",
                                                           "[Memory Affinity]"], tmp_path)
    assert recompiled[36:] == srat[36:]  # the header's creator fields are iasl's own
    names = ("Proximity Domain Low(8)", "Apic ID", "Proximity Domain", "Base Address", "Address Length",
             "Flags (decoded below)")
    assert _fields((tmp_path / "srat.dsl").read_text(), names) == [
        ("Proximity Domain Low(8)", "00"), ("Apic ID", "00"), ("Flags (decoded below)", "00000001"),
        ("Proximity Domain Low(8)", "00"), ("Apic ID", "01"), ("Flags (decoded below)", "00000001"),
        ("Proximity Domain Low(8)", "01"), ("Apic ID", "02"), ("Flags (decoded below)", "00000001"),
        ("Proximity Domain", "00000000"), ("Base Address", "0000000000000000"),
        ("Address Length", "00000000C0000000"), ("Flags (decoded below)", "00000001"),
        ("Proximity Domain", "00000000"), ("Base Address", "0000000100000000"),
        ("Address Length", "0000000020000000"), ("Flags (decoded below)", "00000001"),
        ("Proximity Domain", "00000001"), ("Base Address", "0000000120000000"),
        ("Address Length", "0000000020000000"), ("Flags (decoded below)", "00000001")]
    slit = build_slit(nodes)
    recompiled = disassemble_and_recompile(slit, b"SLIT", ["Localities : 0000000000000002", "Locality 0 : 0A 14",
                                                           "Locality 1 : 1E 0A"], tmp_path)
    assert recompiled[36:] == slit[36:]


def test_the_xsdt_lists_srat_and_slit_only_for_a_numa_guest():
    def signatures(extra) -> list[bytes]:
        placed = dict(layout_acpi_tables(cpus=2, extra_tables=extra))
        xsdt = next(data for data in placed.values() if data[:4] == b"XSDT")
        addresses = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
        return [placed[address][:4] for address in addresses]

    nodes = (NumaNode((0,), 128 * MiB), NumaNode((1,), 128 * MiB))
    assert signatures(numa_tables(nodes, 256 * MiB))[-2:] == [b"SRAT", b"SLIT"]
    assert b"SRAT" not in signatures(numa_tables((), 256 * MiB))


def test_the_machine_description_carries_the_nodes_and_reads_version_2():
    machine = _machine("cpus=0,mem=128M,distances=10:15", "cpus=1,mem=128M,host_node=0")
    description = MachineDescription.from_config(machine)
    assert MachineDescription.from_dict(description.to_dict()).to_config() == machine
    old = description.to_dict()
    old["version"] = 2
    del old["fields"]["numa"]
    assert MachineDescription.from_dict(old).to_config().numa == ()
    broken = description.to_dict()
    broken["fields"]["numa"][0]["fields"]["memory"] = 64 * MiB
    with pytest.raises(StateError, match="the nodes' memory adds up to 192M, the machine has 256M"):
        MachineDescription.from_dict(broken)


def test_a_definitions_numa_list_and_its_errors_name_the_field():
    spec = VmSpec.from_document({"machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
                                 "pyvmm": {"numa": ["cpus=0,mem=192M", "cpus=1,mem=64M"]}})
    machine, _ = spec.machine_config()
    assert machine.numa == (NumaNode((0,), 192 * MiB), NumaNode((1,), 64 * MiB))
    with pytest.raises(ConfigError) as error:
        VmSpec.from_document({"machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
                              "pyvmm": {"numa": ["cpus=0,mem=128M", "cpus=1-2,mem=128M"]}})
    assert str(error.value) == "pyvmm.numa[1]: vCPU 2 is out of range: the machine has 2 vCPUs (0-1)"


def test_binding_plans():
    two = {0: (0, 1), 1: (2, 3)}
    assert plan([None, None], two).host_nodes == (0, 1)
    assert plan([1, None], two).host_nodes == (1, 1)
    assert plan([None, None], {0: (0, 1)}).reason == \
        "guest NUMA nodes are not bound to host nodes: this host has one NUMA node"
    assert plan([None, None, None], two).host_nodes is None
    assert plan([0, 0], {0: (0,)}).host_nodes == (0, 0)  # named explicitly: bound even on one node
    with pytest.raises(ConfigError) as error:
        plan([None, 2], two)
    assert (error.value.field, error.value.detail) == \
        ("numa[1]", ": host node 2 does not exist: this host's NUMA nodes are 0, 1")


def test_memory_bound_to_a_host_node_and_a_thread_pinned():
    """On this host's node 0: the mapping's policy in /proc/self/numa_maps says bind:0."""
    nodes = host_nodes()
    assert 0 in nodes and nodes[0]
    area = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    anchor = ctypes.c_char.from_buffer(area)
    try:
        address = ctypes.addressof(anchor)
        bind_memory(address, 4 * mmap.PAGESIZE, 0)
        area[:4] = b"used"
        with open("/proc/self/numa_maps") as maps:
            line = next(line for line in maps if int(line.split()[0], 16) == address)
        assert " bind:0 " in line
    finally:
        del anchor
        area.close()
    seen = []

    def pinned() -> None:
        pin_thread(threading.get_native_id(), nodes[0][:1])
        seen.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    assert seen == [set(nodes[0][:1])]
