"""Jailed managed VMs (`pyvmm start --jail`, manage/jailer.py) on the default Debian guest.

Two jailed VMs boot side by side, each with a disk and a vsock socket (one also with a tap=auto
NIC, whose namespace and TAP the jailer makes and hands in), under seccomp in kill mode. Each
sees only what it needs (its mounts and device nodes, read from the host), runs as a uid of its
own with no_new_privs in namespaces and control groups of its own, and - the sVirt guarantee -
cannot open the other's disk, API socket or vsock socket, nor (Landlock ABI 6) a host service's
abstract Unix socket: code planted in each VM's own process (a sitecustomize on its PYTHONPATH,
inside its run directory) tries once both run, and says what happened in its log. When they
stop, the files are the host's again and the groups are gone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.managed import managed_env

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings
from pyvmm.jail.landlock import abi_version
from pyvmm.manage.client import connect
from pyvmm.manage.launch import wait_exit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")

PROBE = '''
import json, os, socket, sys, threading, time
def probe():
    own, other, abstract = json.loads(os.environ["PROBE_PATHS"])
    while not os.path.exists(own["run_dir"] + "/probe-go"):   # the test says when both VMs run
        time.sleep(0.2)
    def attempt(what, path):
        try:
            if what == "connect":
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
            else:
                with open(path, "rb") as f:
                    f.read(512)
            return "opened"
        except OSError as exc:
            return type(exc).__name__
    def listing(path):
        try:
            return sorted(os.listdir(path))
        except OSError as exc:
            return type(exc).__name__
    result = {"own_disk": attempt("read", own["disk"]), "abstract_sock": attempt("connect", abstract),
              **{f"other_{k}": attempt("connect" if k.endswith("sock") else "read", v) for k, v in other.items()},
              "root": listing("/"), "dev": listing("/dev")}
    print("PROBE " + json.dumps(result), file=sys.stderr, flush=True)
if os.getuid() != 0:                  # only in the jailed VM process (the CLI and the keeper run as root)
    threading.Thread(target=probe, daemon=True).start()
'''


@pytest.fixture
def env(tmp_path, image):
    """VMs with pyvmm's default seccomp mode, whatever $PYVMM_SECCOMP says."""
    yield from managed_env(tmp_path, inherit_seccomp=False)

def cli(values, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, text=True,
                            env=values, timeout=900)
    assert result.returncode == 0, (args, result.stderr)
    return result


def make_vm(tmp_path: Path, values, name: str) -> dict[str, str]:
    disk = tmp_path / f"{name}-disk" / "data.img"
    disk.parent.mkdir()
    with open(disk, "wb") as f:
        f.write(f"{name}'s data".encode().ljust(4096, b"\0"))
    vsock_dir = tmp_path / f"{name}-vsock"
    vsock_dir.mkdir()
    (tmp_path / f"{name}.toml").write_text(
        f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 128\n'
        f'[[drives]]\ndrive_id = "data"\npath_on_host = "{disk}"\nis_root_device = false\nis_read_only = false\n'
        f'[vsock]\nguest_cid = {3 if name == "alpha" else 4}\nuds_path = "{vsock_dir}/v.sock"\n'
        + ('[[network-interfaces]]\niface_id = "eth0"\nhost_dev_name = "auto"\n' if name == "alpha" else "") +
        f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\nseccomp = "kill"\n[pyvmm.jail]\npids = 256\ncpus = 1.5\n')
    cli(values, "define", str(tmp_path / f"{name}.toml"))
    run_dir = tmp_path / "rt" / "pyvmm" / name
    return {"disk": str(disk), "api_sock": str(run_dir / "api.sock"), "vsock": f"{vsock_dir}/v.sock",
            "run_dir": str(run_dir)}


def test_two_jailed_vms_boot_see_only_their_own_and_cannot_open_each_others_files(env, tmp_path):
    values, host = env
    paths = {name: make_vm(tmp_path, values, name) for name in ("alpha", "beta")}
    # a host service on an abstract Unix socket: no path, so no mount namespace hides it
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0pyvmm-jail-test-{os.getpid()}")
    abstract.listen(4)
    others = {}
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        plant = Path(paths[name]["run_dir"]) / "plant"
        plant.mkdir(parents=True)
        (plant / "sitecustomize.py").write_text(PROBE)
        others[name] = {k: v for k, v in paths[other].items() if k != "run_dir"} | \
            {"run_dir_file": paths[other]["run_dir"] + "/definition.json"}
        probe_paths = json.dumps([paths[name], others[name], f"\0pyvmm-jail-test-{os.getpid()}"])
        cli(dict(values, PYTHONPATH=str(plant), PROBE_PATHS=probe_paths), "start", name, "--jail")
    for name in paths:   # what each probe will try to open is there (a missing file would prove nothing)
        assert all(os.path.exists(path) for path in others[name].values()), others[name]
        Path(paths[name]["run_dir"], "probe-go").touch()

    records = {name: json.loads((Path(paths[name]["run_dir"]) / "jail.json").read_text()) for name in paths}
    pids = {name: host.vm(name).info().pid for name in paths}
    assert records["alpha"]["uid"] != records["beta"]["uid"]
    for name in paths:
        pid, record = pids[name], records[name]
        assert record["pid"] == pid
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(rf"Uid:\s+{record['uid']}\s", status) and re.search(rf"Gid:\s+{record['gid']}\s", status)
        assert re.search(r"NoNewPrivs:\s+1", status) and re.search(r"Seccomp:\s+2", status)
        for kind in ("mnt", "pid", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")   # netns not asked for
        assert f"pyvmm-jail/{name}" in Path(f"/proc/{pid}/cgroup").read_text()
        assert record["cgroup"]["pids"] == 256 and record["cgroup"]["cpus"] == 1.5
        assert Path(record["cgroup"]["paths"][0], "cpu.max" if record["cgroup"]["version"] == 2
                    else "cpu.cfs_quota_us").read_text().split()[0] == "150000"
        assert "4096" in re.search(r"Max open files.*", Path(f"/proc/{pid}/limits").read_text()).group(0)
        # no more than it needs: every mount is an exposed path (or the jail's /, /proc, /tmp)
        mounts = {line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()}
        assert mounts == {"/", "/proc", "/tmp", *record["exposed"]}, mounts ^ {"/", "/proc", "/tmp", *record["exposed"]}
        assert paths[name]["disk"] in record["exposed"] and paths[other_of(name)]["disk"] not in record["exposed"]
        assert not any(p.startswith(paths[other_of(name)]["run_dir"]) for p in record["exposed"])
        disk = os.stat(paths[name]["disk"])
        assert (disk.st_uid, disk.st_mode & 0o777) == (record["uid"], 0o600)

    for name in paths:
        console = wait_for_prompt(host.vm(name))
        warnings = find_kernel_warnings(console)
        assert not warnings, describe(warnings)
        log = wait_for_probe(Path(paths[name]["run_dir"]) / "vmm.log")
        probe = json.loads(re.search(r"PROBE (.*)", log).group(1))
        assert probe["own_disk"] == "opened", probe                      # the probe does open what it may
        for key in ("other_disk", "other_api_sock", "other_vsock", "other_run_dir_file"):
            assert probe[key] in ("FileNotFoundError", "PermissionError"), (key, probe)
        # the abstract socket: only Landlock's scope (ABI 6) keeps a jail without netns from it
        assert probe["abstract_sock"] == ("PermissionError" if abi_version() >= 6 else "opened"), probe
        assert {"kvm", "null", "urandom"} <= set(probe["dev"]) <= {"kvm", "null", "random", "urandom", "userfaultfd",
                                                                 "zero"}, probe
        if abi_version():   # Landlock: not even the jail's own root directory can be listed
            assert re.search(r"pyvmm: jail: uid \d+, gid \d+; Landlock ABI \d+: confined", log), log
            assert probe["root"] == "PermissionError", probe
        else:
            assert set(probe["root"]) <= {"dev", "proc", "tmp", "lib", "lib64",
                                          *(p.split("/")[1] for p in records[name]["exposed"])}

    # alpha's tap=auto NIC: the jailer made its namespace and TAP (the jail has no /dev/net/tun,
    # checked above) and the guest reaches the host's side of it
    (network,) = records["alpha"]["networks"]
    addresses = subprocess.run(["ip", "-n", network["netns"], "-o", "-4", "addr", "show", "dev", network["tap"]],
                               capture_output=True, text=True, check=True).stdout
    assert "10.0.2.1/24" in addresses, addresses
    assert records["beta"]["networks"] == []
    pinged = host.vm("alpha").exec(["sh", "-c", "ip link set eth0 up && { ip addr show eth0 | grep -q 10.0.2.15 || "
                                    "ip addr add 10.0.2.15/24 dev eth0; } && ping -c 1 -W 10 10.0.2.1"])
    assert pinged.status == 0, pinged

    for name in paths:
        cli(values, "destroy", name)
    for name in paths:
        assert wait_exit(records[name]["keeper_pid"], 60)
        disk = os.stat(paths[name]["disk"])
        assert disk.st_uid == os.getuid() and disk.st_mode & 0o777 == 0o644   # the host's again
        assert not any(Path(p).exists() for p in records[name]["cgroup"]["paths"])
    assert not Path("/run/netns", network["netns"]).exists()     # the keeper removed alpha's namespace


def wait_for_probe(log_path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while "PROBE " not in (log := log_path.read_text()):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.2)
    return log


def other_of(name: str) -> str:
    return "beta" if name == "alpha" else "alpha"


def wait_for_prompt(vm, timeout: float = 400) -> bytes:
    deadline = time.monotonic() + timeout
    while b"pyvmm:~# " not in (history := vm.console_history()):
        assert time.monotonic() < deadline, history[-2000:]
        assert vm.state() == "running", vm.info()
        time.sleep(0.5)
    return history


def test_bad_jail_settings_and_machines_a_jail_cannot_hold_are_one_line(env, tmp_path):
    values, _ = env
    for setting, message in (("uid = 0", "pyvmm.jail.uid must be an unprivileged id"),
                             ('pids = "many"', "pyvmm.jail.pids must be a number"),
                             ("colour = 1", "pyvmm.jail.colour: unknown jail setting")):
        path = tmp_path / "bad.toml"
        path.write_text(f"[machine-config]\nvcpu_count = 1\nmem_size_mib = 128\n[pyvmm.jail]\n{setting}\n")
        bad = subprocess.run([sys.executable, "-m", "pyvmm.cli", "define", str(path), "--replace"],
                             capture_output=True, text=True, env=values, timeout=120)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad
        assert message in bad.stderr, bad.stderr
    path = tmp_path / "named.toml"
    path.write_text('[machine-config]\nvcpu_count = 1\nmem_size_mib = 128\n[[network-interfaces]]\n'
                    'iface_id = "eth0"\nhost_dev_name = "tap-named"\n[pyvmm.jail]\nnetns = true\n')
    cli(values, "define", str(path))
    refused = subprocess.run([sys.executable, "-m", "pyvmm.cli", "start", "named", "--jail"], capture_output=True,
                             text=True, env=values, timeout=120)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused
    assert "needs netns = false (or host_dev_name = \"auto\")" in refused.stderr
