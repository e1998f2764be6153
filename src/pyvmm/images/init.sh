#!/bin/sh
# /init of pyvmm's default guest (busybox sh), installed by `pyvmm image build`.
#
# 1. mounts proc, sysfs, devtmpfs (+ devpts) and puts stdio on /dev/console;
# 2. loads the drivers of the devices present ("coldplug"): each module of
#    /lib/modules/$(uname -r)/pyvmm.load ("NAME PATH NEEDS ALIAS..." per line,
#    dependencies first) one of whose ALIAS patterns matches a device's modalias,
#    after the modules it NEEDS; again while that brings new devices (virtio_pci
#    finds the virtio devices behind it); a missing or failing module is reported
#    on the console, never fatal; later, for each device plugged in (a netlink listener);
# 3. with `root=DEVICE`: mounts that root disk and switch_root's to its init (this script
#    again on pyvmm's root filesystem images, where steps 1-2 find their work done);
#    starts the guest agent (bin/pyvmm-agent, vsock port 52) if there is a vsock device;
#    watches the ACPI power button: pressed, it syncs, unmounts and powers off;
# 4. signals "init started": byte 0x01 to I/O port 0x610 (pyvmm's boot timer);
#    with `pyvmm.console=hvc0` (pyvmm run --console virtio) the command or shell below
#    uses that console instead of the boot console; with `pyvmm.ip=ADDR/PREFIX,GW`
#    (pyvmm run --net tap=auto) eth0 is configured;
# 5. with `pyvmm.cmd=<base64 of a shell command>` on the kernel command line:
#    runs it with `sh -c` on the console, prints "pyvmm: exit status N", writes N
#    as one byte to port 0x611 and powers off; otherwise starts an interactive
#    shell on the console and powers off when it exits (a reset instead when the
#    kernel runs without ACPI, where power-off would only halt).
#
# The Debian cloud kernel has no /dev/port (CONFIG_DEVPORT is not set), so port
# writes go through /bin/pyvmm-outb (ioperm + outb); /dev/port is the fallback.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export TERM="${TERM:-linux}"
umask 022

# After a switch from the initramfs to a root disk these are mounted already (moved over).
[ -e /proc/self ] || mount -t proc -o nosuid,nodev,noexec proc /proc
[ -e /sys/kernel ] || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mounts=$(cat /proc/mounts)
case "$mounts" in
    *" /dev devtmpfs "*) dev_mounted=1 ;;
    *) dev_mounted= ;;
esac
if [ -z "$dev_mounted" ] && ! mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev 2>/dev/null; then
    [ -c /dev/console ] || mknod -m 600 /dev/console c 5 1
    [ -c /dev/null ] || mknod -m 666 /dev/null c 1 3
fi
mkdir -p /dev/pts /dev/shm
[ -e /dev/pts/ptmx ] || mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts 2>/dev/null
exec </dev/console >/dev/console 2>&1
# Shell builtins where they do the job: every command started costs the guest milliseconds
# on a software CPU.
echo pyvmm 2>/dev/null >/proc/sys/kernel/hostname

pyvmm_outb() { # PORT VALUE, both decimal
    /bin/pyvmm-outb "$1" "$2" 2>/dev/null && return 0
    [ -c /dev/port ] || return 1
    # shellcheck disable=SC2059
    printf "\\$(printf %03o "$2")" | dd of=/dev/port bs=1 seek="$1" count=1 conv=notrunc 2>/dev/null
}

read -r kver </proc/sys/kernel/osrelease
moddir=/lib/modules/$kver
# pyvmm.load, then the modaliases of the devices present -> "NAME=PATH" for each module to
# load now, in the list's order (skipping those in $loaded), and "NAME=-" for a module the
# image lacks (reported once)
coldplug_awk='
FNR == NR {
    if (NF < 2 || $1 ~ /^#/) next
    if ($2 == "-") { if (loaded == " ") print $1 "=-"; next }
    order[++count] = $1; path[$1] = $2; needs[$1] = $3
    for (i = 4; i <= NF; i++) { patterns[++npatterns] = $i; owner[npatterns] = $1 }
    next
}
{ for (p = 1; p <= npatterns; p++) if ($0 ~ patterns[p]) matched[owner[p]] = 1 }
END {
    for (m in matched) {
        want[m] = 1
        if (needs[m] != "-") { k = split(needs[m], list, ","); for (d = 1; d <= k; d++) want[list[d]] = 1 }
    }
    for (i = 1; i <= count; i++) {
        m = order[i]
        if ((m in want) && index(loaded, " " m " ") == 0) print m "=" path[m]
    }
}'
pyvmm_coldplug() {
    if [ -f "$moddir/pyvmm.load" ]; then
        loaded=" $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')" # those loaded before a root switch
        while :; do
            batch=$(cat /sys/bus/*/devices/*/modalias 2>/dev/null |
                awk -v loaded="$loaded" "$coldplug_awk" "$moddir/pyvmm.load" -)
            [ -n "$batch" ] || break
            for entry in $batch; do
                modname=${entry%%=*} modpath=${entry#*=}
                loaded="$loaded$modname "
                if [ "$modpath" = - ] || [ ! -f "$moddir/$modpath" ]; then
                    echo "pyvmm: module $modname: not in the initramfs"
                elif ! insmod "$moddir/$modpath" 2>/tmp/insmod.err; then
                    echo "pyvmm: module $modname: $(cat /tmp/insmod.err)"
                fi
            done
        done
        rm -f /tmp/insmod.err
    else
        echo "pyvmm: no module list at $moddir/pyvmm.load (kernel $kver)"
    fi
}
# Run by the uevent listener started below (busybox `uevent`, one event at a time, the
# kernel's data in the environment): a device that appears later (PCI hotplug) gets its
# driver the same way, and a CPU plugged in (ACPI CPU hotplug) is brought online, as udev
# rules do on distributions.
if [ "$1" = --uevent ]; then
    if [ "$ACTION" = add ] && [ "$SUBSYSTEM" = cpu ] && [ -w "/sys$DEVPATH/online" ]; then
        echo 1 >"/sys$DEVPATH/online"
    fi
    [ "$ACTION" = add ] && [ -n "$MODALIAS" ] && pyvmm_coldplug
    exit 0
fi
pyvmm_coldplug

# A root disk (`root=DEVICE` on the kernel command line, e.g. /dev/vda; rootfstype=, default
# ext4; rootflags=; ro): mount it and switch to its init (init=, default /sbin/init), which is
# this script again on pyvmm's root filesystem images. Only from the initramfs: a kernel that
# mounted the disk itself starts here with the disk as / already.
root_dev= root_fstype=ext4 root_flags= root_mode=rw new_init=/sbin/init
set -f
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        root=*) root_dev=${arg#root=} ;;
        rootfstype=*) root_fstype=${arg#rootfstype=} ;;
        rootflags=*) root_flags=,${arg#rootflags=} ;;
        ro) root_mode=ro ;;
        rw) root_mode=rw ;;
        init=*) new_init=${arg#init=} ;;
    esac
done
set +f
# (pyvmm's initramfs has /init; its root filesystem images have /sbin/init only)
if [ -n "$root_dev" ] && [ -e /init ]; then
    tries=0
    while [ ! -b "$root_dev" ] && [ $tries -lt 100 ]; do sleep 0.05; tries=$((tries + 1)); done
    modprobe "$root_fstype" 2>/dev/null # built into Debian's kernel for ext4
    mkdir -p /newroot
    if ! [ -b "$root_dev" ]; then
        echo "pyvmm: root device $root_dev did not appear; staying in the initramfs"
    elif ! mount -t "$root_fstype" -o "$root_mode$root_flags" "$root_dev" /newroot; then
        echo "pyvmm: cannot mount $root_dev ($root_fstype, $root_mode$root_flags); staying in the initramfs"
    elif [ ! -x "/newroot$new_init" ] && [ ! -L "/newroot$new_init" ]; then
        echo "pyvmm: $root_dev has no $new_init; staying in the initramfs"
        umount /newroot
    else
        for fs in dev proc sys; do
            mkdir -p "/newroot/$fs" 2>/dev/null
            mount --move "/$fs" "/newroot/$fs" 2>/dev/null || umount -l "/$fs"
        done
        exec switch_root /newroot "$new_init"
    fi
fi

# Drivers for devices plugged in from now on (the kernel has no uevent helper: listen on netlink).
uevent "$0" --uevent </dev/null >/dev/null 2>&1 &

# The guest agent (pyvmm exec / cp, pyvmm.agent.AgentClient) on vsock port 52, when the
# machine has a vsock device.
if [ -d /sys/module/vmw_vsock_virtio_transport ] && [ -x /bin/pyvmm-agent ]; then
    (cd / && exec /bin/pyvmm-agent </dev/null >/dev/null 2>/dev/console) &
fi

# The ACPI power button (pyvmm's Generic Event Device notifies \_SB.PWRB; button.ko reports
# KEY_POWER on its "Power Button" input device): a background reader waits for its first
# event, then powers off cleanly. The kernel does nothing about the button by itself.
pyvmm_poweroff() {
    sync
    umount -a -r 2>/dev/null
    poweroff -f
}
for input in /sys/class/input/input*; do
    read -r input_name <"$input/name" 2>/dev/null || continue
    [ "$input_name" = "Power Button" ] || continue
    [ -d /sys/module/evdev ] || modprobe evdev 2>/dev/null ||
        echo "pyvmm: module evdev: cannot load it; the power button is ignored"
    for event in "$input"/event*; do
        # Opened here, before "init started": a press from then on is not missed. (`command`:
        # a failed redirection of plain `exec` would end init.)
        command exec 3<"/dev/input/${event##*/}" 2>/dev/null || continue
        (
            dd of=/dev/null bs=24 count=1 <&3 2>/dev/null || exit 0
            exec 3<&-
            echo "pyvmm: power button pressed: powering off"
            pyvmm_poweroff
        ) </dev/null &
        exec 3<&-
    done
done

pyvmm_outb 1552 1 # 0x610: init started

set -f
cmd_b64=
console=/dev/console
guest_ip=
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        pyvmm.cmd=*) cmd_b64=${arg#pyvmm.cmd=} ;;
        pyvmm.console=*) console=/dev/${arg#pyvmm.console=} ;;
        pyvmm.ip=*) guest_ip=${arg#pyvmm.ip=} ;;
    esac
done
set +f

# pyvmm run --net tap=auto: eth0 gets ADDRESS/PREFIX and a default route via GATEWAY.
if [ -n "$guest_ip" ]; then
    ip link set lo up
    ip address add "${guest_ip%%,*}" dev eth0 && ip link set eth0 up &&
        ip route add default via "${guest_ip#*,}" ||
        echo "pyvmm: could not configure eth0 with $guest_ip"
fi

# pyvmm run --console virtio: the command's (or the shell's) stdio is the virtio console,
# whose driver was loaded above; kernel messages stay on the boot console.
if [ "$console" != /dev/console ]; then
    tries=0
    while [ ! -c "$console" ] && [ $tries -lt 50 ]; do sleep 0.1; tries=$((tries + 1)); done
    if [ -c "$console" ]; then
        exec <"$console" >"$console" 2>&1
    else
        echo "pyvmm: $console did not appear; staying on the boot console"
        console=/dev/console
    fi
fi

cd /root || cd /
if [ -n "$cmd_b64" ]; then
    if cmd=$(printf '%s\n' "$cmd_b64" | base64 -d 2>/dev/null) && [ -n "$cmd" ]; then
        sh -c "$cmd" <"$console" >"$console" 2>&1
        status=$?
    else
        echo "pyvmm: cannot decode pyvmm.cmd= (base64 expected)"
        status=126
    fi
    echo "pyvmm: exit status $status"
    pyvmm_outb 1553 "$status" # 0x611: exit status
else
    echo "pyvmm guest: Linux $kver, busybox sh on the console; exit or Ctrl-D powers off."
    export PS1='\h:\w\$ '
    if [ "$console" = /dev/console ]; then
        setsid cttyhack sh -l
    else
        setsid sh -c 'exec sh -l <"$1" >"$1" 2>&1' sh "$console" # its controlling tty
    fi
    status=$?
fi
sync
# Let the serial driver send what it still buffers (the command's last output, the status
# line): closing the console's last file makes the tty layer wait until it is sent;
# poweroff -f right away would cut it off.
exec </dev/null >/dev/null 2>&1
if [ -d /sys/firmware/acpi ]; then
    poweroff -f
else
    # Without ACPI the kernel can only halt, and a halted VM does not stop; a reset (i8042
    # 0xFE / triple fault) stops pyvmm without --reboot, and QEMU with -no-reboot.
    reboot -f
fi
# Not reached unless that failed: init exits, the kernel panics (panic=-1 reboots).
exit "$status"
