"""GET /pyvmm/stats: what a running VM costs and does, gathered from its parts.

- vCPUs: each vCPU's exits by reason and interrupts injected (Vcpu.counters(): KVM's binary
  stats fd where the host has one, else the exits that reached pyvmm; the software CPU's
  translator loop); CPU time of each run-loop thread (one per vCPU on KVM, one scheduler
  thread for every vCPU on the software CPU) from /proc/self/task/TID/stat.
- devices: every virtio device's transport-independent counters (requests, malformed chains,
  rings the guest broke) with the model's own (bytes, errors, drops).
- memory: guest RAM resident (mincore over each RAM region's mapping) and the VMM's own
  resident memory beside it (the process's VmRSS less the guest RAM it holds); how RAM is
  backed (huge pages, KSM) and this process's pages KSM merged; with a balloon, its target
  and actual size and the guest's free/available/cached/total memory from its statistics.
Counters are cumulative since the VM (re)booted; rates are the reader's business (top).
"""

from __future__ import annotations

import os
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")


def vcpu_stats(vm: Any) -> tuple[list[dict[str, Any]], dict[str, int], int | None, str | None]:
    """Per-vCPU counters, exits summed over vCPUs, interrupts injected (None: unknown), source."""
    rows: list[dict[str, Any]] = []
    total: dict[str, int] = {}
    injected: int | None = 0
    source: str | None = None
    for vcpu in vm.vcpus:
        counters = vcpu.counters()
        source = counters.source
        rows.append({"index": vcpu.index, "exits": counters.exits, "exits_total": sum(counters.exits.values()),
                     "interrupts_injected": counters.interrupts_injected})
        for reason, count in counters.exits.items():
            total[reason] = total.get(reason, 0) + count
        injected = None if injected is None or counters.interrupts_injected is None \
            else injected + counters.interrupts_injected
    return rows, total, injected, source


def thread_cpu_seconds(tid: int) -> float | None:
    """User + system CPU time of one of this process's threads, or None once it has ended."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of stat(5)


def device_stats(vm: Any) -> dict[str, dict[str, Any]]:
    devices = vm.device_manager.devices() if getattr(vm, "device_manager", None) is not None else vm.devices
    result: dict[str, dict[str, Any]] = {}
    for name, device in devices.items():
        queue_counters = getattr(device, "queue_counters", None)
        if queue_counters is None:
            continue
        own = getattr(device, "stats", None) or getattr(device, "counters", None)
        result[name] = {"kind": type(device).__name__, **queue_counters(), **(own() if callable(own) else {})}
    return result


def memory_stats(vm: Any, rss: int | None) -> dict[str, Any]:
    from ..memory.backing import process_ksm

    regions = getattr(vm.memory, "regions", [])
    guest = getattr(vm.memory, "size", None) or sum(region.size for region in regions)  # RAM, not virtio-mem
    resident = sum(region.resident_bytes() for region in regions)
    machine = getattr(vm, "machine", None)
    ksm = process_ksm()
    result = {"guest_ram_bytes": guest, "guest_ram_resident_bytes": resident, "process_rss_bytes": rss,
              "vmm_overhead_bytes": None if rss is None else max(rss - resident, 0),
              "huge_pages": getattr(machine, "huge_pages", "none"), "ksm": bool(getattr(machine, "ksm", False)),
              "ksm_merging_pages": None if ksm is None else ksm.get("merging_pages")}
    balloon = getattr(vm, "devices", {}).get("virtio-balloon")
    if balloon is not None:
        seen = balloon.statistics()
        result.update({"balloon_target_bytes": seen["target_pages"] << 12, "balloon_actual_bytes": seen["actual_pages"] << 12,
                       **{f"guest_{name}_bytes": seen.get(key) for name, key in _GUEST_MEMORY.items()}})
    return result


# pyvmm's names for the balloon's guest statistics (bytes, as the guest reports them; null until it has)
_GUEST_MEMORY = {"free": "free_memory", "available": "available_memory", "cached": "disk_caches",
                 "total": "total_memory"}


def collect(vm: Any, rss: int | None) -> dict[str, Any]:
    """The stats of a running Vm (see the module's text)."""
    vcpus, exits, injected, source = vcpu_stats(vm)
    threads = {label: thread_cpu_seconds(tid) for label, tid in dict(vm.run_loop_threads).items()}
    return {"vcpus": vcpus, "exits": exits, "exits_total": sum(exits.values()), "exits_source": source,
            "interrupts_injected": injected,
            "vcpu_threads": [{"label": label, "cpu_s": seconds} for label, seconds in threads.items()],
            "vcpu_time_s": sum(seconds for seconds in threads.values() if seconds is not None),
            "devices": device_stats(vm), "memory": memory_stats(vm, rss)}
