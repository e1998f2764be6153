"""Hotplug of a managed VM (the default guest in a process of its own, its agent on vsock):
`pyvmm attach-disk` / `detach-disk` on the running VM, a NIC through the Python client, the
per-VM API's DELETE, --config changing only the definition, and bad requests refused in one
line with exit status 2 while the VM runs on."""

from __future__ import annotations

import re
import subprocess
import sys

from pyvmm.images.kernel_warnings import CONSOLE_LOGLEVEL, describe, find_kernel_warnings
from pyvmm.manage import definitions

from test_managed_vms import PROMPT, cli, read_until

WAIT = "i=0; while ! [ {test} ]; do i=$((i+1)); [ $i -gt 600 ] && exit 9; sleep 0.2; done"


def pyvmm(env, *args: str) -> subprocess.CompletedProcess:
    values, _ = env
    return subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], capture_output=True, text=True, env=values,
                          timeout=300)


def refused(env, *args: str, match: str) -> None:
    result = pyvmm(env, *args)
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(match, result.stderr), result.stderr


def test_disks_and_a_nic_plugged_into_a_managed_vm(env, tmp_path):
    _, host = env
    disk = tmp_path / "data.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-F", str(disk)], check=True)
    extra = tmp_path / "extra.img"
    extra.write_bytes(bytes(1 << 20))
    definition = tmp_path / "hp.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                          f'[vsock]\nguest_cid = 9\nuds_path = "{tmp_path / "hp.vsock"}"\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", "hp")
    vm = host.vm("hp")
    read_until(vm.open_console(), re.escape(PROMPT))

    assert "data attached" in cli(env, "attach-disk", "hp", str(disk), "--id", "data").stdout.decode()
    script = (WAIT.format(test="-b /dev/vda") + "; mkdir -p /mnt/d && mount -t ext2 /dev/vda /mnt/d && "
              "echo hot > /mnt/d/f && cat /mnt/d/f && umount /mnt/d")
    assert vm.exec(["sh", "-c", script]).stdout == b"hot\n"
    assert [d["drive_id"] for d in vm.config()["drives"]] == ["data"]
    assert any(node["id"] == "data" for node in vm.devices())

    refused(env, "attach-disk", "hp", str(extra), "--id", "data", match=r"'data': the VM has that drive already")
    refused(env, "attach-disk", "hp", str(tmp_path / "missing.img"), match=r"path_on_host")
    refused(env, "detach-disk", "hp", "nothing", match=r"'nothing': no such drive")
    refused(env, "detach-disk", "hp", "data", "--timeout", "0", match=r"--timeout must be more than 0")

    cli(env, "detach-disk", "hp", "data")
    assert vm.exec(["sh", "-c", WAIT.format(test="! -b /dev/vda") + "; echo gone"]).stdout == b"gone\n"
    assert vm.config()["drives"] == []

    assert vm.attach_interface(iface_id="net0") == "net0"        # the Python client
    assert vm.exec(["sh", "-c", WAIT.format(test="-e /sys/class/net/eth0") + "; echo up"]).stdout == b"up\n"
    vm.detach_interface("net0")
    assert vm.exec(["sh", "-c", WAIT.format(test="! -e /sys/class/net/eth0") + "; echo down"]).stdout == b"down\n"

    # --config: the definition only (kept for the next start), not the running VM
    cli(env, "attach-disk", "hp", str(extra), "--id", "later", "--config")
    assert [d["drive_id"] for d in definitions.load("hp", host.config_dir).document["drives"]] == ["later"]
    assert vm.config()["drives"] == []
    cli(env, "detach-disk", "hp", "later", "--config")
    assert definitions.load("hp", host.config_dir).document.get("drives", []) == []

    assert vm.state() == "running"
    cli(env, "shutdown", "hp", "--timeout", "300")
    warnings = find_kernel_warnings(vm.console_history())
    assert not warnings, describe(warnings)


def test_setvcpus_on_a_managed_vm(env, tmp_path):
    _, host = env
    definition = tmp_path / "cpus.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                          f'[vsock]\nguest_cid = 10\nuds_path = "{tmp_path / "cpus.vsock"}"\n'
                          f'[pyvmm]\nmax_vcpus = 2\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", "cpus")
    vm = host.vm("cpus")
    read_until(vm.open_console(), re.escape(PROMPT))
    online = WAIT.format(test='"$(cat /sys/devices/system/cpu/online)" = {}')

    # cpu1/online reads 1 once its bring-up is over; the CPU mask shows it before that, when
    # taskset is still refused (test_hotplug_linux.py's CPU_SCRIPT says more)
    cpu1_up = WAIT.format(test='"$(cat /sys/devices/system/cpu/cpu1/online 2>/dev/null)" = 1')

    assert "2 vCPUs" in cli(env, "setvcpus", "cpus", "2").stdout.decode()
    script = cpu1_up + "; taskset -c 1 cut -d' ' -f39 /proc/self/stat"
    assert vm.exec(["sh", "-c", script]).stdout == b"1\n"          # a process ran on the new CPU
    assert vm.vcpus() == {"count": 2, "max": 2} and vm.config()["machine-config"]["vcpu_count"] == 2
    assert vm.info().vcpus == 2 and re.search(r"(?m)^ cpus +running +\d+ +2 ", cli(env, "list").stdout.decode())
    refused(env, "setvcpus", "cpus", "3", match=r"3 vCPUs: this VM can have 1 to 2")
    refused(env, "setvcpus", "cpus", "0", match=r"at least its boot CPU")
    vm.set_vcpus(1)                                                   # the Python client
    assert vm.exec(["sh", "-c", online.format("0") + "; nproc"]).stdout == b"1\n"
    assert vm.vcpus() == {"count": 1, "max": 2} and vm.info().vcpus == 1

    cli(env, "shutdown", "cpus", "--timeout", "300")
    warnings = find_kernel_warnings(vm.console_history())
    assert not warnings, describe(warnings)


def test_the_entropy_device_plugged_into_a_managed_vm_and_what_is_refused(env, tmp_path):
    _, host = env
    definition = tmp_path / "rng.toml"
    definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 256\n'
                          f'[vsock]\nguest_cid = 11\nuds_path = "{tmp_path / "rng.vsock"}"\n'
                          f'[pyvmm]\nkernel_args = "{CONSOLE_LOGLEVEL}"\n')
    cli(env, "define", str(definition))
    cli(env, "start", "rng")
    vm = host.vm("rng")
    read_until(vm.open_console(), re.escape(PROMPT))
    fragment = tmp_path / "entropy.toml"
    fragment.write_text("[entropy]\n")
    available = "/sys/class/misc/hw_random/rng_available"

    assert "entropy attached" in cli(env, "attach-device", "rng", str(fragment)).stdout.decode()
    script = WAIT.format(test=f'-n "$(cat {available} 2>/dev/null)"') + f"; cat {available}"
    assert vm.exec(["sh", "-c", script]).stdout.startswith(b"virtio_rng")   # the guest bound its driver
    assert vm.config()["entropy"] == {}
    refused(env, "attach-device", "rng", str(fragment), match=r"one per VM")
    vsock = tmp_path / "vsock.json"
    vsock.write_text('{"vsock": {"guest_cid": 12, "uds_path": "/tmp/x.vsock"}}')
    refused(env, "attach-device", "rng", str(vsock), match=r"the VM has a vsock device already: one per VM")
    ports = tmp_path / "ports.toml"
    ports.write_text("[balloon]\namount_mib = 0\n")
    refused(env, "attach-device", "rng", str(ports), match=r"error: balloon: the balloon cannot be attached")

    cli(env, "detach-device", "rng", str(fragment))                # the guest ejects it
    assert vm.exec(["sh", "-c", WAIT.format(test=f'-z "$(cat {available} 2>/dev/null)"') + "; echo gone"]
                   ).stdout == b"gone\n"
    assert vm.config().get("entropy") is None
    assert vm.attach_rng() == "entropy"                             # the Python client, again
    vm.detach_device({"entropy": {}}, force=True)

    cli(env, "attach-device", "rng", str(fragment), "--config")     # the definition only
    assert definitions.load("rng", host.config_dir).document["entropy"] == {}
    assert vm.config().get("entropy") is None
    assert vm.state() == "running"
    cli(env, "shutdown", "rng", "--timeout", "300")
    warnings = find_kernel_warnings(vm.console_history())
    assert not warnings, describe(warnings)


def test_setvcpus_on_a_managed_kvm_vm_under_seccomp_kill(tmp_path):
    """KVM CPU hotplug in a VM process of its own, every thread under its seccomp filter: the
    hot-added vCPU (created from an API thread), its parking on removal and its return. The
    guest (tests/kvm/guests/cpuplug.S) says on its console what it saw."""
    import time

    from helpers.managed import managed_env, stop_every_vm
    from helpers.reporting import KVM_GUESTS
    from pyvmm.guests import build_source
    from pyvmm.kvm import Kvm, KvmUnavailable

    try:
        Kvm().close()
    except KvmUnavailable as exc:
        import pytest
        pytest.skip(f"no usable KVM here: {exc}")
    kernel = build_source(KVM_GUESTS / "cpuplug.S", 32)
    env = next(managed_env(tmp_path))
    values, host = env
    values["PYVMM_SECCOMP"] = "kill"
    try:
        definition = tmp_path / "kplug.toml"
        definition.write_text(f'[machine-config]\nvcpu_count = 1\nmem_size_mib = 16\n'
                              f'[boot-source]\nkernel_image_path = "{kernel}"\n'
                              f'[pyvmm]\nmax_vcpus = 2\naccel = "kvm"\n')
        cli(env, "define", str(definition))
        cli(env, "start", "kplug")
        vm = host.vm("kplug")
        for count, line in ((2, b"cpuplug: plug"), (1, b"cpuplug: eject"), (2, b"cpuplug: plug")):
            seen = vm.console_history().count(line)
            assert f"{count} vCPUs" in cli(env, "setvcpus", "kplug", str(count)).stdout.decode()
            deadline = time.monotonic() + 60
            while vm.console_history().count(line) == seen and time.monotonic() < deadline:
                time.sleep(0.05)
            assert vm.console_history().count(line) == seen + 1, vm.console_history()
            assert vm.info().vcpus == count and vm.state() == "running"
    finally:
        stop_every_vm(host)
