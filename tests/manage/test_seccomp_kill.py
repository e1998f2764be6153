"""seccomp in kill mode on managed VMs: a device thread that makes a call outside its
allow-list kills its VM's process (SIGSYS), the control plane reports the VM crashed and why,
and a VM next to it runs on.

The forbidden call is planted from outside pyvmm: a sitecustomize module on the offending VM
process's PYTHONPATH wraps os.urandom (virtio-rng's entropy source) so that, on a device thread
(the I/O thread or a run loop), it first calls chroot(2), which no thread's list allows."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers.managed import managed_env

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings
from pyvmm.manage.launch import wait_exit
from pyvmm.ui.handlers import list_vms

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel log (what seccomp killed) is root's to read")

PLANT = '''
import os, threading
_urandom = os.urandom
def _urandom_on_a_device_thread(n):
    name = threading.current_thread().name
    if name == "pyvmm-io" or name.startswith("vcpu"):
        os.chroot("/")          # outside every allow-list
    return _urandom(n)
os.urandom = _urandom_on_a_device_thread
'''


@pytest.fixture
def env(tmp_path, image):
    """VMs with pyvmm's default seccomp mode, whatever $PYVMM_SECCOMP says."""
    yield from managed_env(tmp_path, inherit_seccomp=False)

def cli(values, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, text=True,
                            env=values, timeout=600)
    if check:
        assert result.returncode == 0, (args, result.stderr)
    return result


def definition(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 128\n[entropy]\n'
                    f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\nseccomp = "kill"\n')
    return str(path)


def test_a_forbidden_call_on_a_device_thread_kills_only_its_vm_and_is_reported(env, tmp_path):
    values, host = env
    planted = tmp_path / "plant"
    planted.mkdir()
    (planted / "sitecustomize.py").write_text(PLANT)
    for name in ("victim", "bystander"):
        cli(values, "define", definition(tmp_path, name))
    cli(values, "start", "bystander")
    cli(dict(values, PYTHONPATH=str(planted)), "start", "victim")
    victim_pid = host.vm("victim").run.pid()
    assert victim_pid is not None

    # the guest's virtio-rng driver asks for entropy while it boots: the I/O thread reads it.
    # (The kernel log, which names the call and thread, is root's to read: so is this test.)
    assert wait_exit(victim_pid, 300), "the victim's VM process still runs: nothing killed it"
    info = cli(values, "dominfo", "victim").stdout
    assert re.search(r"State:\s+crashed", info), info
    assert "killed by seccomp: SIGSYS: chroot on thread vmm-io" in info, info   # from the kernel's log
    assert re.search(r"victim\s+crashed", cli(values, "list").stdout)
    outcome = host.vm("victim").info().outcome
    assert outcome["killed_by"] == "seccomp" and outcome["signal"] == "SIGSYS", outcome
    # the web console's API says the same (GET /api/vms)
    (row,) = [row for row in list_vms(host)["vms"] if row["name"] == "victim"]
    assert row["state"] == "crashed" and row["outcome"]["killed_by"] == "seccomp", row
    assert "SIGSYS: chroot on thread vmm-io" in row["outcome"]["message"], row

    # the other VM, filtered the same way, boots to its shell and runs on
    bystander = host.vm("bystander")
    deadline = time.monotonic() + 300
    while b"pyvmm:~# " not in bystander.console_history():
        assert time.monotonic() < deadline, bystander.console_history()[-2000:]
        assert bystander.state() == "running", cli(values, "dominfo", "bystander").stdout
        time.sleep(0.5)
    with open(f"/proc/{bystander.info().pid}/status") as status:
        assert re.search(r"Seccomp:\s+2", status.read())     # filtered (mode 2), and alive
    warnings = find_kernel_warnings(bystander.console_history())
    assert not warnings, describe(warnings)
    cli(values, "destroy", "bystander")
