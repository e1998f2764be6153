"""A guest NUMA topology and the ACPI tables that describe it: SRAT and SLIT.

Nodes are given in order, each with its vCPUs, its memory and its distances to every node:
`cpus=0-1,mem=128M,distances=10:20` (the CLI's --numa, a definition's [pyvmm] numa list).
Guest RAM goes to the nodes in guest-physical order (node 0 gets the first `mem` bytes, and so
on, across the 32-bit hole). The SRAT (ACPI 6.5, 5.2.16) gives each vCPU's local APIC and each
memory range a proximity domain (the node's index); the SLIT (5.2.17) the distance matrix,
which Linux takes only if every node is 10 from itself and more than 10 from the others.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ...errors import ConfigError
from ...persist import State
from . import layout
from .acpi import sdt

LOCAL_DISTANCE, REMOTE_DISTANCE = 10, 20   # Linux's LOCAL_DISTANCE; QEMU's default for other nodes
MAX_NODES = 64
NODE_MIN_SIZE = 4 << 20                    # Linux ignores smaller nodes (arch/x86/mm/numa.c NODE_MIN_SIZE)

SRAT_REVISION, SLIT_REVISION = 3, 1
SRAT_PROCESSOR_APIC, SRAT_MEMORY = 0, 1
SRAT_ENABLED = 1 << 0


@dataclass(frozen=True)
class NumaNode(State):
    """One guest node: its vCPU indices, its memory in bytes, its distance to each node (None:
    10 to itself, 20 to the others)."""
    KIND = "numa-node"
    cpus: tuple[int, ...]
    memory: int
    distances: tuple[int, ...] | None = None
    host_node: int | None = None       # the host node to bind it to (None: host/numa.py decides)

    def describe(self) -> str:
        text = f"cpus={format_cpu_list(self.cpus)},mem={self.memory >> 20}M"
        text += f",distances={':'.join(map(str, self.distances))}" if self.distances else ""
        return text + (f",host_node={self.host_node}" if self.host_node is not None else "")


def parse_cpu_list(text: str, field: str) -> tuple[int, ...]:
    """'0-2;5' (or '0-2:5') -> (0, 1, 2, 5); '' -> () (a node with memory only)."""
    cpus: list[int] = []
    for part in filter(None, re.split(r"[;:]", text)):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise ConfigError(f": {part!r} is not a vCPU index or range like 0-3", field)
        first = int(match.group(1))
        cpus.extend(range(first, int(match.group(2) or first) + 1))
    return tuple(cpus)


def format_cpu_list(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2;5' (sysfs writes the same list '0-2,5')."""
    parts, ordered = [], sorted(cpus)
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        parts.append(str(ordered[index]) if end == index else f"{ordered[index]}-{ordered[end]}")
        index = end + 1
    return ";".join(parts)


def validate_topology(nodes: tuple[NumaNode, ...], cpus: int, memory: int, field: str = "numa") -> None:
    """The nodes must hold every vCPU once and add up to the machine's memory."""
    if not nodes:
        return
    if len(nodes) > MAX_NODES:
        raise ConfigError(f": at most {MAX_NODES} nodes (got {len(nodes)})", field)
    seen: dict[int, int] = {}
    for index, node in enumerate(nodes):
        where = f"{field}[{index}]"
        for cpu in node.cpus:
            if cpu >= cpus:
                raise ConfigError(f": vCPU {cpu} is out of range: the machine has {cpus} vCPUs (0-{cpus - 1})", where)
            if cpu in seen:
                raise ConfigError(f": vCPU {cpu} is in node {seen[cpu]} already", where)
            seen[cpu] = index
        if node.memory < NODE_MIN_SIZE or node.memory % (1 << 20):
            raise ConfigError(f": mem must be a whole number of MiB, at least {NODE_MIN_SIZE >> 20}M "
                              f"(got {node.memory} bytes)", where)
        if node.distances is not None:
            if len(node.distances) != len(nodes):
                raise ConfigError(f": distances must give one distance per node ({len(nodes)}), got "
                                  f"{len(node.distances)}", where)
            for other, distance in enumerate(node.distances):
                if other == index and distance != LOCAL_DISTANCE:
                    raise ConfigError(f": the distance of a node to itself must be {LOCAL_DISTANCE} "
                                      f"(got {distance})", where)
                if other != index and not LOCAL_DISTANCE < distance < 255:
                    raise ConfigError(f": the distance to node {other} must be 11-254 (got {distance})", where)
    missing = sorted(set(range(cpus)) - set(seen))
    if missing:
        raise ConfigError(f": vCPU {format_cpu_list(tuple(missing)).replace(';', ',')} is in no node", field)
    total = sum(node.memory for node in nodes)
    if total != memory:
        raise ConfigError(f": the nodes' memory adds up to {total >> 20}M, the machine has {memory >> 20}M", field)


def distance_matrix(nodes: tuple[NumaNode, ...]) -> list[list[int]]:
    return [list(node.distances) if node.distances is not None else
            [LOCAL_DISTANCE if other == index else REMOTE_DISTANCE for other in range(len(nodes))]
            for index, node in enumerate(nodes)]


def node_ranges(nodes: tuple[NumaNode, ...], memory: int) -> list[tuple[int, int, int]]:
    """(node, guest-physical base, size) of every RAM range, in address order."""
    ranges = []
    regions = [(int(r.guest_base), r.size) for r in layout.ram_regions(memory)]
    node, left = 0, nodes[0].memory
    for base, size in regions:
        while size:
            while left == 0:
                node += 1
                left = nodes[node].memory
            piece = min(size, left)
            ranges.append((node, base, piece))
            base, size, left = base + piece, size - piece, left - piece
    return ranges


def srat_processor_apic(domain: int, apic_id: int) -> bytes:
    return struct.pack("<BBBBIB3sI", SRAT_PROCESSOR_APIC, 16, domain & 0xFF, apic_id, SRAT_ENABLED, 0,
                       (domain >> 8).to_bytes(3, "little"), 0)


def srat_memory(domain: int, base: int, size: int) -> bytes:
    return struct.pack("<BBIHIIIIIIQ", SRAT_MEMORY, 40, domain, 0, base & 0xFFFF_FFFF, base >> 32,
                       size & 0xFFFF_FFFF, size >> 32, 0, SRAT_ENABLED, 0)


def build_srat(nodes: tuple[NumaNode, ...], memory: int) -> bytes:
    """Each vCPU's local APIC (APIC ID = vCPU index, as the MADT says) and each RAM range in
    its node's proximity domain (= the node's index)."""
    entries = [srat_processor_apic(index, cpu) for index, node in enumerate(nodes) for cpu in sorted(node.cpus)]
    entries += [srat_memory(node, base, size) for node, base, size in node_ranges(nodes, memory)]
    return sdt(b"SRAT", SRAT_REVISION, struct.pack("<IQ", 1, 0) + b"".join(entries))  # 1: reserved, for old OSes


def build_slit(nodes: tuple[NumaNode, ...]) -> bytes:
    matrix = distance_matrix(nodes)
    return sdt(b"SLIT", SLIT_REVISION, struct.pack("<Q", len(nodes)) + bytes(d for row in matrix for d in row))


def numa_tables(nodes: tuple[NumaNode, ...], memory: int) -> list[bytes]:
    """The SRAT and SLIT of a topology, for build_acpi_tables(extra_tables=...); none without one."""
    return [build_srat(nodes, memory), build_slit(nodes)] if nodes else []
