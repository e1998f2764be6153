"""Binding a guest's NUMA nodes to the host's: memory with mbind(2), vCPU threads with
sched_setaffinity(2).

Guest node i goes to the host node its `host_node` names, or, when none is named, to host
node i where the host has as many nodes as the guest; a host with one node (ours) cannot bind
anything, and says so in one line. Binding is a placement policy, not guest state: a guest
runs the same whether or not its nodes are bound.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass

from ..errors import ConfigError

log = logging.getLogger(__name__)

NODE_SYSFS = "/sys/devices/system/node"
MPOL_BIND = 2
MPOL_MF_MOVE = 1 << 1        # move pages already placed elsewhere (guest RAM touched before binding)
SYS_MBIND = 237              # x86-64
_libc = ctypes.CDLL(None, use_errno=True)


def host_nodes(sysfs: str = NODE_SYSFS) -> dict[int, tuple[int, ...]]:
    """The host's NUMA nodes with memory or CPUs: node -> its CPUs. One node when the kernel
    has no NUMA support (no sysfs node directory)."""
    try:
        names = os.listdir(sysfs)
    except OSError:
        return {0: tuple(sorted(os.sched_getaffinity(0)))}
    nodes = {}
    for name in names:
        match = re.fullmatch(r"node(\d+)", name)
        if match:
            with open(os.path.join(sysfs, name, "cpulist")) as cpulist:
                nodes[int(match.group(1))] = _cpu_list(cpulist.read())
    return nodes or {0: tuple(sorted(os.sched_getaffinity(0)))}


def _cpu_list(text: str) -> tuple[int, ...]:
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return tuple(cpus)


@dataclass(frozen=True)
class Binding:
    """Where each guest node goes: host_nodes[i] for guest node i, or None with the reason."""
    host_nodes: tuple[int, ...] | None
    reason: str = ""


def plan(requested: list[int | None], available: dict[int, tuple[int, ...]]) -> Binding:
    """Guest nodes (each with its requested host node, or None) onto the host's nodes.
    A host node asked for and missing is bad input (ConfigError)."""
    for index, node in enumerate(requested):
        if node is not None and node not in available:
            raise ConfigError(f": host node {node} does not exist: this host's NUMA nodes are "
                              f"{', '.join(map(str, sorted(available)))}", f"numa[{index}]")
    if all(node is not None for node in requested):
        return Binding(tuple(node for node in requested if node is not None))
    if len(available) < 2:
        return Binding(None, "guest NUMA nodes are not bound to host nodes: this host has one NUMA node")
    if len(available) < len(requested):
        return Binding(None, f"guest NUMA nodes are not bound to host nodes: the guest has {len(requested)}, "
                             f"this host {len(available)} (name host_node= for each to bind them)")
    ordered = sorted(available)
    return Binding(tuple(node if node is not None else ordered[index] for index, node in enumerate(requested)))


def bind_memory(address: int, length: int, node: int) -> None:
    """Host memory behind [address, address+length) of this process on host node `node` only
    (pages already there are moved)."""
    mask = (ctypes.c_ulong * (node // 64 + 1))()
    mask[node // 64] = 1 << (node % 64)
    result = _libc.syscall(SYS_MBIND, ctypes.c_void_p(address), ctypes.c_ulong(length), MPOL_BIND, mask,
                           ctypes.c_ulong(len(mask) * 64 + 1), MPOL_MF_MOVE)
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mbind of guest RAM to host node {node} failed: {os.strerror(error)}")


def pin_thread(tid: int, cpus: tuple[int, ...]) -> None:
    os.sched_setaffinity(tid, cpus)
