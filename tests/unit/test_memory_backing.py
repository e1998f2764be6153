"""How guest RAM is backed (memory/backing.py): hugetlb pages from the host's pool, transparent
huge pages, KSM merging, and the one-line refusals when the host cannot give them. Tests that
change the host's pools or KSM need root and put back what they found."""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys


import pytest

from pyvmm.config import ConfigError, MachineConfig
from pyvmm.memory import GuestMemory
from pyvmm.memory import backing as backing_module
from pyvmm.memory.backing import HUGETLB_POOL, KSM_DIR, Backing, check_host, process_ksm, thp_mode
from pyvmm.memory.guest_memory import RegionSpec

MIB = 1 << 20
ROOT = os.geteuid() == 0


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


@contextlib.contextmanager
def hugetlb_pages(count: int):
    """Reserve `count` more 2 MiB pages for the test; the pool goes back to its size after."""
    if not ROOT or not os.path.exists(f"{HUGETLB_POOL}/nr_hugepages"):
        pytest.skip("reserving hugetlb pages needs root and a 2 MiB pool")
    before = int(_read(f"{HUGETLB_POOL}/nr_hugepages"))
    try:
        _write(f"{HUGETLB_POOL}/nr_hugepages", str(before + count))
        if int(_read(f"{HUGETLB_POOL}/free_hugepages")) < count:
            pytest.skip("the host could not reserve the hugetlb pages (fragmented memory)")
        yield
    finally:
        _write(f"{HUGETLB_POOL}/nr_hugepages", str(before))


def test_guest_ram_on_hugetlb_pages_and_a_discard_gives_whole_pages_back():
    with hugetlb_pages(8):
        free = int(_read(f"{HUGETLB_POOL}/free_hugepages"))
        check_host(Backing("2M"), 16 * MIB)
        with GuestMemory.from_specs([RegionSpec(0, 16 * MIB)], Backing("2M")) as memory:
            region = memory.regions[0]
            assert region.fd >= 0 and region.discard_unit == 2 * MIB  # still a memfd: shareable
            memory.fill(0, 16 * MIB, 0x33)
            assert int(_read(f"{HUGETLB_POOL}/free_hugepages")) == free - 8  # the pool's pages hold it
            assert memory.discard(4 * MIB + 4096, 8 * MIB) == 6 * MIB        # the partial pages at the ends stay
            assert int(_read(f"{HUGETLB_POOL}/free_hugepages")) == free - 5
            assert memory.read_u8(4 * MIB) == 0x33 and memory.read_u8(6 * MIB) == 0
        assert int(_read(f"{HUGETLB_POOL}/free_hugepages")) == free


def test_hugetlb_refused_in_one_line_when_the_pool_is_short(monkeypatch):
    monkeypatch.setattr(backing_module, "hugetlb_free_pages", lambda: 3)
    with pytest.raises(ConfigError) as refused:
        check_host(Backing("2M"), 256 * MIB)
    message = str(refused.value)
    assert refused.value.field == "huge_pages" and "3 free 2 MiB hugetlb pages, 128 are needed" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="multiple of 2 MiB"):
        check_host(Backing("2M"), 255 * MIB)


def test_transparent_huge_pages_refused_when_the_host_has_them_off(monkeypatch):
    monkeypatch.setattr(backing_module, "thp_mode", lambda: "never")
    with pytest.raises(ConfigError, match="transparent huge pages are off") as refused:
        check_host(Backing("transparent"), 256 * MIB)
    assert refused.value.field == "huge_pages"


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping at `address` in /proc/self/smaps."""
    inside = False
    for line in _read("/proc/self/smaps").splitlines():
        if "-" in line.split()[0] and ":" not in line.split()[0]:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_transparent_huge_pages_back_anonymous_guest_ram():
    if thp_mode() in (None, "never"):
        pytest.skip("this host has transparent huge pages off")
    with GuestMemory.from_specs([RegionSpec(0, 32 * MIB)], Backing("transparent")) as memory:
        region = memory.regions[0]
        assert region.fd == -1  # THP needs anonymous private memory
        memory.fill(0, 32 * MIB, 0x44)
        assert _anon_huge_kib(region.host_address) >= 8 * 1024
        before = region.resident_bytes()
        assert memory.discard(8 * MIB, 8 * MIB) == 8 * MIB
        assert before - region.resident_bytes() == 8 * MIB


@contextlib.contextmanager
def ksm_running():
    if not ROOT or not os.path.isdir(KSM_DIR):
        pytest.skip("starting KSM needs root and a kernel with KSM")
    from helpers.host_memory import ksm_running as running

    with running():
        yield


def test_ksm_merges_the_identical_pages_of_mergeable_guest_ram():
    with ksm_running():
        # in a child process, so that this test's count is its own
        code = ("import time\n"
                "from pyvmm.memory import GuestMemory\nfrom pyvmm.memory.backing import Backing, process_ksm\n"
                "from pyvmm.memory.guest_memory import RegionSpec\n"
                "m = GuestMemory.from_specs([RegionSpec(0, 16 << 20)], Backing(mergeable=True))\n"
                "page = bytes(range(256)) * 16\n"
                "for a in range(0, 16 << 20, 4096): m.write(a, page)\n"
                "deadline = time.monotonic() + 120\n"
                "while (process_ksm() or {}).get('merging_pages', 0) < 3000 and time.monotonic() < deadline:\n"
                "    time.sleep(0.2)\n"
                "print(process_ksm()['merging_pages'])\n")
        merged = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
        assert merged.returncode == 0, merged.stderr
        assert int(merged.stdout) >= 3000  # of the 4096 identical pages


def test_plain_memfd_ram_is_not_offered_to_ksm():
    with GuestMemory.from_specs([RegionSpec(0, 4 * MIB)]) as memory:
        assert memory.regions[0].fd >= 0 and memory.regions[0].backing == Backing()
    stats = process_ksm()
    assert stats is None or "merging_pages" in stats


def test_machine_config_refuses_combinations_that_cannot_work():
    with pytest.raises(ConfigError, match="cannot merge hugetlb") as hugetlb_ksm:
        MachineConfig(huge_pages="2M", ksm=True).validate()
    assert hugetlb_ksm.value.field == "ksm"
    with pytest.raises(ConfigError, match="must be one of none, 2M, transparent"):
        MachineConfig(huge_pages="1G").validate()
    from pyvmm.config import DiskConfig

    with pytest.raises(ConfigError, match="vhost-user disk maps guest RAM by its memfd"):
        MachineConfig(ksm=True, disks=(DiskConfig(vhost_user="/tmp/x.sock"),)).validate()


def test_private_mapping_discard_of_a_file_copy_reverts_to_the_file(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(b"\x77" * (4 * MIB))
    from pyvmm.memory.guest_memory import MemoryRegion

    fd = os.open(path, os.O_RDONLY)
    try:
        region = MemoryRegion(0, 4 * MIB, file=(fd, 0))
        memory = GuestMemory([region])
        memory.fill(0, MIB, 0x11)
        assert memory.discard(0, MIB) == MIB
        assert memory.read(0, mmap.PAGESIZE) == b"\x77" * mmap.PAGESIZE  # the private copy is gone
        memory.close()
    finally:
        os.close(fd)


def test_huge_pages_the_host_cannot_give_are_refused_by_the_cli_and_the_api(monkeypatch):
    from pyvmm.api.instance import VmInstance

    monkeypatch.setattr(backing_module, "hugetlb_free_pages", lambda: 0)
    instance = VmInstance()
    with pytest.raises(ConfigError) as refused:
        instance.put_machine_config({"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "2M"})
    assert str(refused.value).startswith("machine-config.huge_pages 2M: the host has 0 free 2 MiB hugetlb pages")
    assert instance.machine_config()["huge_pages"] == "None"  # nothing changed
    monkeypatch.undo()
    if backing_module.hugetlb_free_pages() >= 128:
        pytest.skip("this host has 256 MiB of hugetlb pages free: the CLI would not refuse")
    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", "run", "--huge-pages", "2M"], capture_output=True,
                            text=True, env=dict(os.environ, PYVMM_KVM_DEVICE="/nonexistent/kvm"), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "--huge-pages 2M: the host has" in result.stderr, result.stderr
