"""The memory inspector on a live tiny guest, on both accelerators: GET /pyvmm/memory/translate
and /read through the per-VM API, the Python client and `pyvmm mem` on a managed VM.

The guest (guests/pagewalk.S) builds page tables of its own: GVA 0xffff800000005000 -> GPA
0x305000 through a 4 KiB page (writable, supervisor, no-execute), where it counts; the low
4 GiB stay identity-mapped by the entry's 2 MiB pages."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

import pytest

from helpers.reporting import KVM_GUESTS
from pyvmm.api.instance import VmInstance
from pyvmm.api.schema import VmSpec
from pyvmm.api.server import ApiServer
from pyvmm.guests import build_source
from pyvmm.manage.client import ApiClient, ApiError, Host

PAGE_GVA, PAGE_GPA = 0xFFFF_8000_0000_5000, 0x305000
NEW_PML4, PDPT, PD, PT = 0x310000, 0x311000, 0x312000, 0x313000


def _kernel() -> str:
    return str(build_source(KVM_GUESTS / "pagewalk.S", 64))


def _counting(memory) -> int:
    deadline = time.monotonic() + 60
    while memory.read_u64(PAGE_GPA) < 100:
        assert time.monotonic() < deadline, "the guest does not count through its own page tables"
        time.sleep(0.001)
    return memory.read_u64(PAGE_GPA)


@pytest.fixture
def running(accel, tmp_path):
    """(VmInstance, ApiClient) of the pagewalk guest, counting."""
    from pyvmm.accel.kvm.accelerator import install_kick_handler

    install_kick_handler()
    instance = VmInstance("inspected", VmSpec(pyvmm={"accel": accel}))
    server = ApiServer(instance, str(tmp_path / "api.sock")).start()
    api = ApiClient(str(tmp_path / "api.sock"))
    api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 16})
    api.put("/boot-source", {"kernel_image_path": _kernel()})
    api.put("/actions", {"action_type": "InstanceStart"})
    try:
        _counting(instance.vm.memory)
        yield instance, api
    finally:
        server.close()
        if instance.vm is not None:
            instance.stop(wait=30)


def _translate(api: ApiClient, gva: int) -> dict:
    return api.get(f"/pyvmm/memory/translate?gva={gva:#x}&vcpu=0")


def test_a_4k_page_of_the_guests_own_tables_level_by_level(running, accel):
    instance, api = running
    result = _translate(api, PAGE_GVA + 0x123)
    assert result["mode"] == "4-level" and result["cr3"] & ~0xFFF == NEW_PML4
    assert [(level["level"], level["table"], level["index"]) for level in result["levels"]] == [
        ("PML4", NEW_PML4, 256), ("PDPT", PDPT, 0), ("PD", PD, 0), ("PT", PT, 5)]
    pte = result["levels"][3]
    assert pte["entry_address"] == PT + 5 * 8 and pte["entry"] & ~0xFFF & ((1 << 63) - 1) == PAGE_GPA
    assert {"P", "RW", "NX"} <= set(pte["flags"]) and "US" not in pte["flags"]
    assert result["mapped"] and result["fault"] is None
    assert (result["gpa"], result["page_size"]) == (PAGE_GPA + 0x123, 4096)
    assert result["access"] == {"writable": True, "user": False, "executable": False}
    # the HVA is this process's mapping of that guest-physical byte: the count is there
    region = instance.vm.memory.regions[0]
    assert result["hva"] == region.host_address + PAGE_GPA + 0x123 - int(region.guest_base)
    assert result["pid"] == os.getpid() and result["host"]["present"]
    if os.geteuid() == 0:
        assert result["host"]["hpa"] % 4096 == 0x123
    if accel == "kvm":
        assert result["kvm_translate"] == {"gpa": PAGE_GPA + 0x123, "valid": True, "writeable": True,
                                           "usermode": False, "agrees": True}
    else:
        assert result["kvm_translate"] is None
    assert api.get("/")["state"] == "Running"  # paused for the walk, resumed after
    before = instance.vm.memory.read_u64(PAGE_GPA)
    _counting_past(instance, before)


def _counting_past(instance, value: int) -> None:
    deadline = time.monotonic() + 60
    while instance.vm.memory.read_u64(PAGE_GPA) <= value:
        assert time.monotonic() < deadline, "the guest stopped counting"
        time.sleep(0.001)


def test_large_pages_and_where_unmapped_walks_stop(running, accel):
    instance, api = running
    low = _translate(api, 0x345678)  # the entry's identity map: a 2 MiB page
    assert [level["level"] for level in low["levels"]] == ["PML4", "PDPT", "PD"]
    assert "PS" in low["levels"][2]["flags"] and (low["gpa"], low["page_size"]) == (0x345678, 2 << 20)
    absent = _translate(api, PAGE_GVA + 0x1000)
    assert not absent["mapped"] and absent["gpa"] is None and absent["hva"] is None
    assert absent["fault"] == f"PT entry 6 at {PT + 6 * 8:#x} is not present (0x0)"
    assert [level["level"] for level in absent["levels"]] == ["PML4", "PDPT", "PD", "PT"]
    noncanonical = _translate(api, 0x0000_8000_0000_0000)
    assert noncanonical["levels"] == [] and "not canonical" in noncanonical["fault"]
    beyond_ram = _translate(api, 0x0200_0000)  # identity-mapped, but the guest has 16 MiB of RAM
    assert beyond_ram["mapped"] and beyond_ram["hva"] is None
    assert beyond_ram["fault"] == "GPA 0x2000000 is not guest RAM (device memory or a hole)"
    if accel == "kvm":
        assert absent["kvm_translate"]["valid"] is False and absent["kvm_translate"]["agrees"]
        assert low["kvm_translate"]["gpa"] == 0x345678 and low["kvm_translate"]["agrees"]


def test_reads_through_the_page_tables_and_physical_ones_agree(running):
    instance, api = running
    api.patch("/vm", {"state": "Paused"})
    count = instance.vm.memory.read_u64(PAGE_GPA)
    virtual = api.get(f"/pyvmm/memory/read?address={PAGE_GVA:#x}&length=8")
    physical = api.get(f"/pyvmm/memory/read?address={PAGE_GPA:#x}&length=8&physical=true")
    assert virtual == physical == count.to_bytes(8, "little")
    assert api.get("/")["state"] == "Paused"  # a paused VM stays paused
    # a read across the end of the mapped page names the first unmapped GVA
    with pytest.raises(ApiError) as error:
        api.get(f"/pyvmm/memory/read?address={PAGE_GVA + 0xFF8:#x}&length=16")
    assert error.value.status == 400
    assert error.value.fault_message == f"GVA {PAGE_GVA + 0x1000:#x} is not mapped: PT entry 6 at " \
                                        f"{PT + 6 * 8:#x} is not present (0x0)"
    # the low identity map spans pages: a read across 2 MiB pages is one piece of RAM
    assert api.get("/pyvmm/memory/read?address=0x1ffff0&length=32") == instance.vm.memory.read(0x1FFFF0, 32)
    api.patch("/vm", {"state": "Resumed"})


@pytest.mark.parametrize("query,message", [
    ("translate?gva=zz", "gva must be an address, hex (0x...) or decimal (got 'zz')"),
    ("translate?gva=0x1&vcpu=1", "vcpu must be a vCPU index, 0-0 (got '1')"),
    ("translate?gva=0x10000000000000000", "gva must be a 64-bit address (got '0x10000000000000000')"),
    ("read?address=0x1000&length=0", "length must be a number of bytes, 1-1048576 (got '0')"),
    ("read?address=0x1000&length=8&physical=maybe", "physical must be true or false (got 'maybe')"),
    ("read?address=0xfff000&length=8192&physical=true",
     "guest-physical 0x1000000 is not guest RAM (device memory or a hole)"),
])
def test_bad_requests_are_one_line_400s(running, query, message):
    _, api = running
    with pytest.raises(ApiError) as error:
        api.get(f"/pyvmm/memory/{query}")
    assert (error.value.status, error.value.fault_message) == (400, message)


def test_a_vm_not_started_has_no_memory_to_inspect(tmp_path):
    server = ApiServer(VmInstance("idle"), str(tmp_path / "api.sock")).start()
    try:
        with pytest.raises(ApiError) as error:
            ApiClient(str(tmp_path / "api.sock")).get("/pyvmm/memory/translate?gva=0x1000")
        assert (error.value.status, error.value.fault_message) == (400, "the VM has not been started")
    finally:
        server.close()


def _pyvmm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_pyvmm_mem_and_the_client_on_a_managed_vm(accel, tmp_path, monkeypatch):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    vm = Host().define({"machine-config": {"vcpu_count": 1, "mem_size_mib": 16},
                        "boot-source": {"kernel_image_path": _kernel()}, "pyvmm": {"accel": accel}}, name="walked")
    vm.start()
    try:
        deadline = time.monotonic() + 60
        while int.from_bytes(vm.read_memory(PAGE_GPA, 8, physical=True), "little") < 100:
            assert time.monotonic() < deadline, "the managed guest does not count"
            time.sleep(0.05)
        # the client
        result = vm.translate(PAGE_GVA)
        assert result["gpa"] == PAGE_GPA and result["pid"] == vm.run.pid()
        assert vm.read_memory(PAGE_GVA, 8) != b"\0" * 8
        # the command: the walk as text, level by level
        shown = _pyvmm(env, "mem", "translate", "walked", hex(PAGE_GVA + 8))
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0].startswith(f"GVA {PAGE_GVA + 8:#x}, vCPU 0: paging 4-level (CR0 ")
        assert lines[1].startswith(f"  PML4  table {NEW_PML4:#x}  [256] at {NEW_PML4 + 256 * 8:#x}: ")
        assert lines[4].startswith(f"  PT    table {PT:#x}  [  5] at {PT + 5 * 8:#x}: ")
        assert lines[4].endswith("P RW A D NX")  # the guest's own write set A and D
        assert lines[5] == f"GPA {PAGE_GPA + 8:#x}  (4 KiB page; writable)"
        assert lines[6].startswith("HVA 0x") and f"process {vm.run.pid()}" in lines[6]
        assert lines[7].startswith("HPA ")
        if accel == "kvm":
            assert lines[8] == f"KVM_TRANSLATE: GPA {PAGE_GPA + 8:#x} (agrees)"
        as_json = json.loads(_pyvmm(env, "mem", "translate", "walked", str(PAGE_GVA), "--json").stdout)
        assert as_json["gpa"] == PAGE_GPA
        # unmapped: the walk up to where it stopped, then one error line, exit 2
        unmapped = _pyvmm(env, "mem", "translate", "walked", hex(PAGE_GVA + 0x1000))
        assert unmapped.returncode == 2
        assert f"  stops: PT entry 6 at {PT + 6 * 8:#x} is not present (0x0)" in unmapped.stdout.splitlines()
        assert unmapped.stderr == f"pyvmm: error: GVA {PAGE_GVA + 0x1000:#x} is not mapped: PT entry 6 at " \
                                  f"{PT + 6 * 8:#x} is not present (0x0)\n"
        # reads: a hex dump of the guest's code (the ELF's first bytes: `cli` is 0xfa), raw to a file
        dump = _pyvmm(env, "mem", "read", "walked", hex(NEW_PML4), "16", "--physical")
        assert dump.returncode == 0, dump.stderr
        entry0 = vm.read_memory(NEW_PML4, 8, physical=True)
        assert dump.stdout.startswith(f"{NEW_PML4:016x}: {entry0[:2].hex()} {entry0[2:4].hex()} ")
        out = tmp_path / "pt.bin"
        raw = _pyvmm(env, "mem", "read", "walked", hex(PT), "4K", "--physical", "-o", str(out))
        assert raw.returncode == 0 and out.read_bytes() == vm.read_memory(PT, 4096, physical=True)
        assert int.from_bytes(out.read_bytes()[40:48], "little") & 0xFFFFF000 == PAGE_GPA
        for args, message in ((("0xzz", "8"), "ADDR: not an address: '0xzz' (hex 0x... or decimal)"),
                              (("0x1000", "2M"), "LEN: '2M' is not a length of 1 to 1048576 bytes")):
            bad = _pyvmm(env, "mem", "read", "walked", *args)
            assert (bad.returncode, bad.stderr) == (2, f"pyvmm: error: {message}\n")
        unknown = _pyvmm(env, "mem", "translate", "nosuch", "0x1000")
        assert (unknown.returncode, unknown.stderr) == (2, "pyvmm: error: no VM named 'nosuch'\n")
    finally:
        vm.destroy()
