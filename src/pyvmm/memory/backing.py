"""How guest RAM is backed on the host: plain memfd, hugetlb pages, transparent huge pages, KSM.

- default: a shared memfd (vhost-user back-ends and snapshots can use the fd).
- hugetlb (`huge_pages=2M`): a memfd with MFD_HUGETLB, from the host's reserved pool
  (/sys/kernel/mm/hugepages/hugepages-2048kB); the mapping reserves its pages up front, so
  a short pool fails at start, not with a SIGBUS later.
- THP (`huge_pages=transparent`) and KSM (`ksm`): the kernel gives transparent huge pages
  to, and KSM merges, only *anonymous private* memory (a memfd is shmem: MADV_MERGEABLE
  is silently ignored there and THP follows shmem_enabled, usually `never`). RAM is then
  an anonymous private mapping with MADV_HUGEPAGE and/or MADV_MERGEABLE, and has no fd.

`check_host()` says in one line why the host cannot give what is asked for.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError

HUGETLB_PAGE: Final = 2 << 20
HUGETLB_POOL = "/sys/kernel/mm/hugepages/hugepages-2048kB"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
KSM_DIR = "/sys/kernel/mm/ksm"
HUGE_PAGES = ("none", "2M", "transparent")


@dataclass(frozen=True)
class Backing:
    huge_pages: str = "none"    # none | 2M (hugetlb) | transparent (THP)
    mergeable: bool = False     # KSM

    @property
    def hugetlb(self) -> bool:
        return self.huge_pages == "2M"

    @property
    def thp(self) -> bool:
        return self.huge_pages == "transparent"

    @property
    def anonymous(self) -> bool:
        """RAM must be anonymous private memory for the kernel to apply THP or KSM to it."""
        return self.thp or self.mergeable


DEFAULT_BACKING: Final = Backing()


def apply_advice(mapping: mmap.mmap, backing: Backing) -> None:
    if backing.thp:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    if backing.mergeable:
        mapping.madvise(mmap.MADV_MERGEABLE)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def hugetlb_free_pages() -> int:
    """Free 2 MiB pages in the host's hugetlb pool (0 where there is none)."""
    text = _read(f"{HUGETLB_POOL}/free_hugepages")
    return int(text) if text and text.isdigit() else 0


def thp_mode() -> str | None:
    """always | madvise | never (the bracketed word of the host's setting), None if absent."""
    text = _read(THP_ENABLED)
    if text is None or "[" not in text:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def check_host(backing: Backing, memory_size: int) -> None:
    """ConfigError (one line, naming the field) unless this host can back `memory_size` bytes so."""
    if backing.hugetlb:
        if memory_size % HUGETLB_PAGE:
            raise ConfigError("2M: guest memory must be a multiple of 2 MiB on huge pages", "huge_pages")
        needed, free = memory_size // HUGETLB_PAGE, hugetlb_free_pages()
        if free < needed:
            raise ConfigError(f"2M: the host has {free} free 2 MiB hugetlb pages, {needed} are needed (reserve them "
                              f"in {HUGETLB_POOL}/nr_hugepages, or use huge_pages=transparent)", "huge_pages")
    if backing.thp and thp_mode() in (None, "never"):
        raise ConfigError(f"transparent: the host's transparent huge pages are off ({THP_ENABLED}: "
                          f"{thp_mode() or 'missing'})", "huge_pages")
    if backing.mergeable and not os.path.isdir(KSM_DIR):
        raise ConfigError(f"this host kernel has no KSM ({KSM_DIR} is missing)", "ksm")


def process_ksm(pid: int | str = "self") -> dict[str, int] | None:
    """The KSM counters of a process (/proc/PID/ksm_stat, or ksm_merging_pages on older kernels):
    merging_pages is how many of its pages share a KSM page now. None where the kernel has neither."""
    text = _read(f"/proc/{pid}/ksm_stat")
    if text is not None:
        stats: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                stats[key.removeprefix("ksm_")] = int(value)
        return stats
    merging = _read(f"/proc/{pid}/ksm_merging_pages")
    return {"merging_pages": int(merging)} if merging and merging.isdigit() else None
