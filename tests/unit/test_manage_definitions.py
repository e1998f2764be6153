"""Definitions (TOML/JSON files checked by the API's schema), run records, sparse clone copies,
and the management commands' one-line errors. No guest boots here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyvmm.manage import definitions
from pyvmm.clones import CloneExists, copy_sparse
from pyvmm.manage.client import connect
from pyvmm.manage.records import RunDir, UnknownVm, VmExists

GOOD = """# a comment survives
name = "web"

[machine-config]
vcpu_count = 2
mem_size_mib = 512

[[drives]]
drive_id = "data"
path_on_host = "/srv/web.img"
is_root_device = false

[[network-interfaces]]
iface_id = "eth0"
host_dev_name = "tap0"
guest_mac = "52:54:00:00:00:01"

[vsock]
guest_cid = 7
uds_path = "/tmp/web.vsock"

[pyvmm]
accel = "tcg"
cpu_hide = ["xsave"]
"""


@pytest.fixture
def host(tmp_path):
    return connect(tmp_path / "vms", tmp_path / "run")


def test_a_toml_definition_is_kept_as_written(host, tmp_path):
    source = tmp_path / "web.toml"
    source.write_text(GOOD)
    vm = host.define(source)
    assert vm.name == "web"
    assert (tmp_path / "vms" / "web.toml").read_text() == GOOD
    spec = definitions.load("web", host.config_dir).spec
    assert spec.machine["vcpu_count"] == 2 and spec.vsock["guest_cid"] == 7
    machine, options = spec.machine_config()
    assert machine.memory == 512 << 20 and machine.cpu_hide == {"xsave"} and options.accel == "tcg"
    info = vm.info()
    assert (info.state, info.vcpus, info.memory_mib, info.pid) == ("shut off", 2, 512, None)
    assert [i.name for i in host.list(all=True)] == ["web"] and host.list() == []


def test_dump_toml_reads_back_the_same_document():
    document = definitions.parse(GOOD, ".toml", "test")
    again = definitions.parse(definitions.dump_toml(document), ".toml", "test")
    assert again == document


def test_json_definitions_and_the_stem_as_name(host, tmp_path):
    source = tmp_path / "fc.json"
    source.write_text('{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}')
    assert host.define(source).name == "fc"
    with pytest.raises(VmExists):
        host.define(source)
    host.define(source, replace=True)


@pytest.mark.parametrize("text,message", [
    ('[machine-config]\nvcpu_count = "two"\nmem_size_mib = 128\n', "machine-config.vcpu_count must be an integer"),
    ("[machine-config]\nvcpu_count = 1\n", "machine-config.mem_size_mib is required"),
    ('[[drives]]\ndrive_id = "a"\nis_root_device = false\n', "drives[0].path_on_host give path_on_host"),
    ('[[network-interfaces]]\niface_id = "e"\nhost_dev_name = "tap0"\nguest_mac = "01:00:00:00:00:00"\n',
     "network-interfaces[0].guest_mac '01:00:00:00:00:00' is not a unicast"),
    ("[vsock]\nguest_cid = 2\nuds_path = \"/x\"\n", "vsock.guest_cid must be at least 3"),
    ('[pyvmm]\naccel = "fast"\n', "pyvmm.accel must be one of auto, kvm, tcg"),
    ('[pyvmm]\ntransport = "usb"\n', "pyvmm.transport must be one of pci, mmio"),
    ('[machines]\n', "machines is not a known section"),
    ("[machine-config\n", "not valid TOML"),
])
def test_malformed_definitions_name_the_file_and_field(host, tmp_path, text, message):
    source = tmp_path / "bad.toml"
    source.write_text(text)
    with pytest.raises(definitions.DefinitionError) as error:
        host.define(source)
    assert str(error.value).startswith(f"{source}: ") and message in str(error.value)


def test_unknown_vms_and_bad_names(host):
    with pytest.raises(UnknownVm):
        host.vm("nothing")
    with pytest.raises(Exception, match="is not a VM name"):
        host.vm("../etc")


def test_a_record_without_a_live_process_or_outcome_is_a_crash(host):
    run = RunDir.of("ghost", host.run_root)
    run.prepare()
    run.pid_file.write_text("999999999 1\n")  # no such process
    run.vmm_log.write_text("booting\nsomething went wrong\n")
    info = host.vm("ghost").info()
    assert info.state == "crashed" and info.outcome["reason"] == "process-died"
    assert "something went wrong" in info.outcome["message"]
    assert [i.name for i in host.list()] == ["ghost"]  # a crash is listed without --all
    run.write_outcome({"reason": "poweroff", "status": 0, "message": "the guest powered off"})
    assert host.vm("ghost").info().state == "shut off"


def test_sparse_copy_keeps_holes_and_data(tmp_path):
    source, target = tmp_path / "disk.img", tmp_path / "copy.img"
    with open(source, "wb") as out:
        out.truncate(64 << 20)
        out.seek(1 << 20)
        out.write(b"A" * 4096)
        out.seek(40 << 20)
        out.write(b"B" * 8192)
    copy_sparse(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert os.stat(target).st_blocks * 512 < 1 << 20  # 64 MiB apparent, a few KiB allocated
    with pytest.raises(CloneExists, match="exists already: pyvmm will not overwrite it$"):
        copy_sparse(source, target)


def test_clone_copies_writable_disks_and_renews_identity(host, tmp_path):
    disk, shared = tmp_path / "web.img", tmp_path / "base.img"
    disk.write_bytes(b"x" * 8192)
    shared.write_bytes(b"y" * 4096)
    document = definitions.parse(GOOD, ".toml", "test")
    document["drives"] = [{"drive_id": "data", "path_on_host": str(disk), "is_root_device": False},
                          {"drive_id": "base", "path_on_host": str(shared), "is_root_device": False,
                           "is_read_only": True}]
    host.define(document, "web")
    clone = host.vm("web").clone("web2")
    spec = definitions.load("web2", host.config_dir).spec
    assert spec.drives["data"]["path_on_host"] == str(tmp_path / "web2-data.img")
    assert (tmp_path / "web2-data.img").read_bytes() == disk.read_bytes()
    assert spec.drives["base"]["path_on_host"] == str(shared)
    assert spec.interfaces["eth0"]["guest_mac"] != "52:54:00:00:00:01"
    assert spec.vsock["guest_cid"] == 8 and spec.vsock["uds_path"] == "/tmp/web2.vsock"
    assert clone.name == "web2"
    with pytest.raises(VmExists):
        host.vm("web").clone("web2")


def pyvmm(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), XDG_RUNTIME_DIR=str(tmp_path / "rt"))
    return subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[machine-config]\nvcpu_count = 0\nmem_size_mib = 128\n")
    good = tmp_path / "vm1.toml"
    good.write_text('[boot-source]\nkernel_image_path = "/no/such/kernel"\n')
    cases = [("start", "nosuch"), ("dominfo", "nosuch"), ("define", str(bad)), ("suspend", "nosuch")]
    for args in cases:
        result = pyvmm(tmp_path, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("pyvmm: error: "), result.stderr
    assert pyvmm(tmp_path, "define", str(good)).returncode == 0
    duplicate = pyvmm(tmp_path, "define", str(good))
    assert duplicate.returncode == 2 and "defined already" in duplicate.stderr
    # the kernel is looked at when the VM starts: the VM's process reports it in one line
    start = pyvmm(tmp_path, "start", "vm1")
    assert start.returncode == 2 and start.stderr.count("\n") == 1 and "/no/such/kernel" in start.stderr, start.stderr
    assert "failed" in pyvmm(tmp_path, "domstate", "vm1").stdout
    assert pyvmm(tmp_path, "undefine", "vm1").returncode == 0
    assert pyvmm(tmp_path, "list", "--all").stdout.count("\n") == 2  # the two header lines only
