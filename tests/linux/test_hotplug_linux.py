"""PCI hotplug with the default Linux guest on the software CPU: a disk plugged into the running
guest is found without a rescan (acpiphp, through the GED), mounted, written and read back,
unplugged after umount (the guest ejects it) and plugged in again with its data; a NIC plugged
in carries traffic; a snapshot taken after hotplug restores with the devices, and the restored
VM takes more."""

from __future__ import annotations

import subprocess

from pyvmm.config import DiskConfig, NetConfig, MachineConfig
from pyvmm.hotplug import attach_disk, attach_net, detach
from pyvmm.restore import carry_over
from pyvmm.snapshot import load_snapshot, save_snapshot

STEP_TIMEOUT = 120

SCRIPT = r"""
wait_for() { while ! [ $1 $2 ]; do sleep 0.2; done; }
echo step-boot-done
wait_for -b /dev/vda
mkdir -p /mnt/d && mount -t ext2 /dev/vda /mnt/d && echo plugged-data > /mnt/d/f.txt && sync && umount /mnt/d
echo step-written
while [ -b /dev/vda ]; do sleep 0.2; done
echo step-disk-gone
wait_for -b /dev/vda
mount -t ext2 /dev/vda /mnt/d && echo "read-back: $(cat /mnt/d/f.txt)"
echo step-remounted
wait_for -e /sys/class/net/eth0
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up
ping -c 1 -W 10 10.0.2.1 >/dev/null && echo ping-1-ok
echo step-nic-done
wait_for -b /dev/vdb
echo "after-restore: $(cat /mnt/d/f.txt) $(cat /sys/block/vdb/size)"
ip neigh flush dev eth0   # the restored NIC's tap=auto is a new host network (another MAC at 10.0.2.1)
ping -c 1 -W 10 10.0.2.1 >/dev/null && echo ping-2-ok
echo step-all-done
"""


def make_ext2(path, size_mb: int = 16) -> None:
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-F", str(path)], check=True)


def test_disk_and_nic_hotplug_and_a_snapshot_after_it(pyvmm, tmp_path):
    disk, second = tmp_path / "disk.img", tmp_path / "second.img"
    make_ext2(disk)
    second.write_bytes(bytes(2 << 20))
    guest = pyvmm.in_process(MachineConfig(), ["sh", "-c", SCRIPT], accel="tcg")
    try:
        vm = guest.vm
        vm.start()
        at = guest.wait_for(b"step-boot-done")
        assert attach_disk(vm, DiskConfig(str(disk), id="data")) == "data"
        at = guest.wait_for(b"step-written", after=at, timeout=STEP_TIMEOUT)
        detach(vm, "data", timeout=STEP_TIMEOUT)
        assert "data" not in vm.device_manager.tree and vm.machine.disks == ()
        at = guest.wait_for(b"step-disk-gone", after=at, timeout=STEP_TIMEOUT)
        attach_disk(vm, DiskConfig(str(disk), id="data"))
        at = guest.wait_for(b"step-remounted", after=at, timeout=STEP_TIMEOUT)
        assert attach_net(vm, NetConfig()) == "virtio-net0"
        at = guest.wait_for(b"step-nic-done", after=at, timeout=STEP_TIMEOUT)

        vm.pause()
        save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
        carried = carry_over(vm)
        vm.close()
        guest.vm = vm = load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem", guest.console_write,
                                      carryover=carried)
        assert {"data", "virtio-net0"} <= set(vm.devices)
        vm.resume()
        attach_disk(vm, DiskConfig(str(second), id="second"))
        guest.wait_for(b"step-all-done", after=at, timeout=STEP_TIMEOUT)
    finally:
        guest.kill()
    text = guest.text()
    guest.check_kernel_warnings()
    assert "read-back: plugged-data" in text
    assert "ping-1-ok" in text
    assert "after-restore: plugged-data 4096" in text
    assert "ping-2-ok" in text


# A CPU counts in /sys/devices/system/cpu/online as soon as it is marked online, well before
# its bring-up is over (it is not yet "active": sched_setaffinity refuses it, and the write
# of 1 to its online file, by /init's uevent listener, still runs, holding the device hotplug
# lock an eject needs). Its own cpu1/online reads 1 only once that write has returned: waiting
# on the CPU mask instead made `taskset -c 1` fail and let the test snapshot the VM in the
# middle of the bring-up, both more often the more loaded the host (the flake of session 4).
CPU_SCRIPT = r"""
online() { cat /sys/devices/system/cpu/online; }
cpu1() { cat /sys/devices/system/cpu/cpu1/online 2>/dev/null || echo absent; }
wait_for() { i=0; while [ "$($1)" != "$2" ] && [ $i -lt 600 ]; do i=$((i+1)); sleep 0.2; done; }
echo "start: possible=$(cat /sys/devices/system/cpu/possible) online=$(online)"
echo step-boot-done
wait_for cpu1 1
echo "grown: online=$(online) nproc=$(nproc) ran-on=$(taskset -c 1 cut -d' ' -f39 /proc/self/stat)"
echo step-grown
wait_for online 0
dmesg | tail -5
echo "shrunk: online=$(online) nproc=$(nproc)"
echo step-shrunk
wait_for cpu1 1
echo "again: online=$(online) ran-on=$(taskset -c 1 cut -d' ' -f39 /proc/self/stat)"
echo step-all-done
"""


def test_vcpus_grow_and_shrink_and_a_snapshot_keeps_the_new_one(pyvmm, tmp_path):
    from pyvmm.hotplug import HotplugError, set_vcpus

    guest = pyvmm.in_process(MachineConfig(cpus=1, max_cpus=2), ["sh", "-c", CPU_SCRIPT], accel="tcg")
    try:
        vm = guest.vm
        vm.start()
        at = guest.wait_for(b"step-boot-done")
        set_vcpus(vm, 2)
        assert len(vm.vcpus) == 2 and vm.machine.cpus == 2
        at = guest.wait_for(b"step-grown", after=at, timeout=STEP_TIMEOUT)

        vm.pause()        # a snapshot with the plugged-in vCPU restores with it
        save_snapshot(vm, tmp_path / "vm.state", tmp_path / "vm.mem")
        carried = carry_over(vm)
        vm.close()
        guest.vm = vm = load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem", guest.console_write,
                                      carryover=carried)
        assert len(vm.vcpus) == 2
        vm.resume()

        for count in (3, 0):      # beyond the maximum, the boot CPU: refused, the VM unharmed
            try:
                set_vcpus(vm, count)
            except HotplugError as exc:
                assert "1 to 2" in str(exc)
            else:
                raise AssertionError(f"set_vcpus({count}) was accepted")
        try:
            set_vcpus(vm, 1, timeout=STEP_TIMEOUT)
        except HotplugError as exc:
            raise AssertionError(f"{exc}; the guest's console ends: {guest.text()[-3000:]}") from None
        assert len(vm.vcpus) == 1 and vm.machine.cpus == 1
        at = guest.wait_for(b"step-shrunk", after=at, timeout=STEP_TIMEOUT)
        set_vcpus(vm, 2)
        guest.wait_for(b"step-all-done", after=at, timeout=STEP_TIMEOUT)
    finally:
        guest.kill()
    text = guest.text()
    guest.check_kernel_warnings()
    assert "start: possible=0-1 online=0" in text
    assert "grown: online=0-1 nproc=2 ran-on=1" in text
    assert "shrunk: online=0 nproc=1" in text
    assert "again: online=0-1 ran-on=1" in text
