"""The jailer's parts that need no VM: its settings, its control groups on a cgroup v2 tree (a
fake one: our hosts bind the controllers to v1) and on a v1 layout, what it exposes, Landlock on
its own, the TAPs it hands in, and its refusal to run without root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from pyvmm.config import ConfigError
from pyvmm.jail import JailConfig
from pyvmm.jail.cgroups import Cgroup, CgroupError
from pyvmm.jail.exposure import JailRefused, plan


def test_settings_are_checked_field_by_field():
    assert JailConfig.from_options({}) == JailConfig() == JailConfig.from_options(True)
    assert JailConfig.from_options({"uid": 5000, "cpus": 2, "netns": True}).gid is None
    for options, field in (({"uid": 0}, "pyvmm.jail.uid"), ({"cpus": 0}, "pyvmm.jail.cpus"),
                           ({"netns": 1}, "pyvmm.jail.netns"), ({"pids": True}, "pyvmm.jail.pids"),
                           ({"memory_mib": 1}, "pyvmm.jail.memory_mib"), ({"x": 1}, "pyvmm.jail.x"),
                           ("yes", "pyvmm.jail")):
        with pytest.raises(ConfigError) as error:
            JailConfig.from_options(options)
        assert error.value.field == field


def fake_v2(root, controllers="cpu memory pids io"):
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("io\n")
    return root


def test_cgroup_v2_enables_the_controllers_and_writes_the_limits(tmp_path, monkeypatch):
    root = fake_v2(tmp_path / "cg")
    real_mkdir = type(root).mkdir

    def mkdir(self, *args, **kwargs):  # the kernel fills a new group with its files
        real_mkdir(self, *args, **kwargs)
        (self / "cgroup.subtree_control").touch()
    monkeypatch.setattr(type(root), "mkdir", mkdir)
    group = Cgroup("web", cpus=0.5, memory_bytes=300 << 20, pids=64, root=root).create()
    path = root / "pyvmm-jail" / "web"
    assert group.version == 2 and group.paths == [path]
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (root / "pyvmm-jail" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (path / "cpu.max").read_text() == "50000 100000"
    assert (path / "memory.max").read_text() == str(300 << 20)
    assert (path / "pids.max").read_text() == "64"
    group.add(0)
    assert (path / "cgroup.procs").read_text() == "0"


def test_cgroup_v2_without_a_controller_is_one_line(tmp_path):
    with pytest.raises(CgroupError, match="lacks the memory, pids controller"):
        Cgroup("web", cpus=1, memory_bytes=1 << 30, pids=64, root=fake_v2(tmp_path / "cg", "cpu io")).create()


def test_cgroup_v1_puts_each_limit_under_the_jailers_own_group(tmp_path):
    for controller in ("cpu", "memory", "pids"):
        (tmp_path / controller).mkdir()
    group = Cgroup("db", cpus=2, memory_bytes=1 << 30, pids=100, root=tmp_path,
                   proc_cgroup="4:memory:/outer/inner\n8:pids:/\n1:cpu:/\n0::/\n").create()
    cpu, memory, pids = group.paths
    assert memory == tmp_path / "memory/outer/inner/pyvmm-jail/db"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "200000"
    assert (memory / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (pids / "pids.max").read_text() == "100"


def test_the_exposure_holds_the_machines_files_and_refuses_what_a_jail_cannot_hold(tmp_path):
    disk, kernel = tmp_path / "d.img", tmp_path / "vmlinux"
    disk.write_bytes(b"x")
    kernel.write_bytes(b"k")
    (tmp_path / "vsock").mkdir(mode=0o755)
    document = {"boot-source": {"kernel_image_path": str(kernel)},
                "drives": [{"drive_id": "d", "path_on_host": str(disk), "is_read_only": True}],
                "vsock": {"guest_cid": 3, "uds_path": str(tmp_path / "vsock" / "v.sock")}}
    exposure = plan(document, tmp_path, None, netns=False)
    assert exposure.paths[str(disk)] is False and exposure.paths[str(kernel)] is False
    assert exposure.paths[str(tmp_path / "vsock")] is True and exposure.paths[str(tmp_path)] is True
    assert sys.base_prefix in exposure.paths and "net/tun" not in exposure.devices
    assert exposure.owned == [str(disk), str(tmp_path / "vsock")]
    # tap=auto: the jailer hands the TAP in (no /dev/net/tun), also with a namespace of its own;
    # a named TAP is opened inside (the device node), where the host's TAPs are
    auto = plan({**document, "network-interfaces": [{"iface_id": "e", "host_dev_name": "auto"}]}, tmp_path, None,
                netns=True)
    assert "net/tun" not in auto.devices
    named = {**document, "network-interfaces": [{"iface_id": "e", "host_dev_name": "tap7"}]}
    assert "net/tun" in plan(named, tmp_path, None, netns=False).devices
    with pytest.raises(JailRefused, match="needs netns = false"):
        plan(named, tmp_path, None, netns=True)
    with pytest.raises(JailRefused, match="a directory of its own"):
        plan({"boot-source": document["boot-source"], "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}},
             tmp_path, None, netns=False)


def test_the_jailer_needs_root(tmp_path, monkeypatch, capsys):
    from pyvmm.manage import jailer

    (tmp_path / "definition.json").write_text(json.dumps({"machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert jailer.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("pyvmm: error: jail: the jailer needs root (namespaces, control groups, "
                                       "device nodes, another uid)\n")


def test_handed_taps_are_read_from_the_environment_and_a_nic_without_one_is_refused(monkeypatch):
    from pyvmm.net import handed
    from pyvmm.net.netns import HostNetworkError

    monkeypatch.delenv(handed.ENV, raising=False)
    assert handed.open_handed(0) is None and handed.open_handed(None) is None    # not jailed: make one
    taps = [handed.HandedTap(7, "tap0", "pyvmm-1-0"), handed.HandedTap(9, "tap0", "pyvmm-1-1")]
    monkeypatch.setenv(handed.ENV, handed.encode(taps))
    assert handed.handed_taps() == taps
    for auto_index in (None, 2):   # plugged at run time, or more NICs than the jailer made TAPs for
        with pytest.raises(HostNetworkError, match="a NIC added at run time needs a TAP owned by the VM's uid"):
            handed.open_handed(auto_index)


def test_landlock_alone_confines_files_abstract_sockets_and_signals(tmp_path):
    """Each thing Landlock denies, on its own (no namespace, no other uid): a file outside the
    given paths; from ABI 6 an abstract Unix socket and a signal to a process outside."""
    from pyvmm.jail.landlock import abi_version

    abi = abi_version()
    if not abi:
        pytest.skip("no Landlock in this kernel")
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    for directory in (inside, outside):
        directory.mkdir()
        (directory / "f").write_text("data")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"\0pyvmm-landlock-test-{os.getpid()}")
    listener.listen()
    code = textwrap.dedent(f"""
        import os, socket
        from pyvmm.jail.landlock import restrict_to
        def attempt(action):
            try:
                action()
                return "allowed"
            except PermissionError:
                return "denied"
        restrict_to([("{inside}", False)])
        print(attempt(lambda: open("{inside}/f").read()), attempt(lambda: open("{outside}/f").read()),
              attempt(lambda: socket.socket(socket.AF_UNIX).connect("\\0pyvmm-landlock-test-{os.getpid()}")),
              attempt(lambda: os.kill({os.getpid()}, 0)))
    """)
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        listener.close()
    scoped = "denied" if abi >= 6 else "allowed"
    assert result.stdout.split() == ["allowed", "denied", scoped, scoped], result
