"""`pyvmm jail RUN_DIR` (also `pyvmm-jailer`): start a managed VM's process in a jail.

As root, outside: choose the VM's uid/gid (its own unless the definition names one), hand it
the VM's run directory, disk images and vsock directory (their owner and mode are restored when
the VM ends), create its control group (CPU, memory, PIDs) and, for each tap=auto NIC, a network
namespace and TAP whose open descriptor the VM process inherits (net/handed.py), then fork into
a new PID namespace.
The child - PID 1 there, and the VM's process itself - unshares mount, IPC, UTS (and with
netns, network) namespaces, builds a private root on a tmpfs holding only the exposure
(jail/exposure.py) and device nodes of its own, pivots into it, sets resource limits, drops to the
unprivileged uid/gid with no_new_privs, confines itself with Landlock where the kernel has it,
and executes `python -m pyvmm.manage.vmprocess RUN_DIR --jailed`.
The parent stays outside as the VM's keeper: it writes the pid file (the host's pid of the VM
process), waits, records a death by seccomp's SIGSYS as the outcome, gives the files back,
removes the control group and the TAPs' namespaces and exits with the VM process's status.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

from ..errors import UserError, user_error_message
from ..jail import namespaces as ns
from ..jail.config import UID_BASE, UID_SLOTS, VMM_OVERHEAD_MIB, JailConfig, jail_options
from ..jail.exposure import DEVICES, OWNED_DEVICES, Exposure, plan
from ..net.handed import ENV as HANDED_ENV
from ..net.handed import HandedTap
from ..net.handed import encode as encode_taps
from .records import RunDir
from .vmprocess import SECCOMP_KILLED, SECCOMP_WHY

JAIL_ROOTS = Path("/run/pyvmm-jail")   # each jail's tmpfs root is mounted at JAIL_ROOTS/NAME (in its own namespace)
RECORD = "jail.json"


def _allocate_ids(run, jail: JailConfig) -> tuple[int, int]:
    """The jail's uid and gid: the definition's, or the first slot no other live jail holds."""
    if jail.uid is not None:
        return jail.uid, jail.gid if jail.gid is not None else jail.uid
    taken = set()
    for other in run.path.parent.iterdir():
        record = other / RECORD
        if other != run.path and record.exists():
            try:
                data = json.loads(record.read_text())
            except (OSError, ValueError):
                continue
            if data.get("keeper_pid") and os.path.exists(f"/proc/{data['keeper_pid']}"):
                taken.add(data["uid"])
    for slot in range(UID_SLOTS):
        if UID_BASE + slot not in taken:
            return UID_BASE + slot, (jail.gid if jail.gid is not None else UID_BASE + slot)
    raise UserError("jail: every automatic uid is in use")


def _hand_over(paths: list[str], uid: int, gid: int) -> list[tuple[str, int, int, int]]:
    """chown `paths` to the VM (files also mode 0600: readable by it alone); their previous owner and mode."""
    previous = []
    for path in paths:
        info = os.stat(path)
        previous.append((path, info.st_uid, info.st_gid, info.st_mode & 0o7777))
        os.chown(path, uid, gid)
        if os.path.isfile(path):
            os.chmod(path, 0o600)
    return previous


def _give_back(previous: list[tuple[str, int, int, int]]) -> None:
    for path, uid, gid, mode in previous:
        try:
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        except OSError:
            pass  # removed meanwhile


def _build_root(root: str, exposure: Exposure, uid: int, gid: int, name: str) -> None:
    """In the child, in its new mount namespace: the private root, then pivot into it."""
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
    os.makedirs(root, exist_ok=True)
    ns.mount("tmpfs", root, "tmpfs", ns.MS_NOSUID, "mode=0755,size=16m")
    # /proc and /tmp first: an exposed path under /tmp (a test's files) is bound onto the jail's own /tmp
    for directory, fstype, flags in (("/proc", "proc", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC),
                                     ("/tmp", "tmpfs", ns.MS_NOSUID | ns.MS_NODEV)):
        os.makedirs(root + directory, exist_ok=True)
        ns.mount(fstype, root + directory, fstype, flags, "mode=1777,size=64m" if fstype == "tmpfs" else None)
    for path, writable in sorted(exposure.paths.items()):
        target = root + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        elif not os.path.exists(target):
            open(target, "a").close()
        ns.mount(path, target, None, ns.MS_BIND | ns.MS_REC)
        flags = ns.MS_BIND | ns.MS_REMOUNT | ns.MS_NOSUID | ns.MS_NODEV | (0 if writable else ns.MS_RDONLY)
        ns.mount(None, target, None, flags)
    for link in ("/lib", "/lib64"):   # merged /usr: the loader's paths
        if os.path.islink(link):
            os.symlink(os.readlink(link), root + link)
    os.makedirs(root + ("/dev/net" if "net/tun" in exposure.devices else "/dev"), exist_ok=True)
    for device in exposure.devices:
        major, minor = DEVICES[device]
        node = f"{root}/dev/{device}"
        os.mknod(node, 0o600 | 0o020000, os.makedev(major, minor))
        if device in OWNED_DEVICES:
            os.chown(node, uid, gid)
        else:
            os.chmod(node, 0o666)
    os.chdir(root)
    ns.pivot_root(".", ".")
    ns.umount2(".", ns.MNT_DETACH)       # the host's root, stacked under ours by pivot_root(".", ".")
    os.chdir("/")
    ns.sethostname(name[:64])


def _make_networks(document: dict) -> list:
    """A network namespace and TAP (net/netns.py) for each tap=auto NIC, made here as root: the
    jailed process could not (no `ip`, no privilege); it gets the TAPs' descriptors (net/handed.py)."""
    from ..net.netns import HostNetwork

    networks: list[HostNetwork] = []
    try:
        for net in document.get("network-interfaces") or []:
            if net.get("host_dev_name") == "auto":
                networks.append(HostNetwork().open())
    except BaseException:
        for network in networks:
            network.close()
        raise
    return networks


def _enter(run, exposure: Exposure, jail: JailConfig, uid: int, gid: int, vm_argv: list[str], go: int,
           taps: list[HandedTap]) -> None:
    """The child: PID 1 of its PID namespace; becomes the jailed VM process (never returns).
    It starts once the keeper has recorded its pid (a byte on `go`)."""
    try:
        os.read(go, 1)
        os.close(go)
        for tap in taps:
            os.set_inheritable(tap.fd, True)
        if taps:
            os.environ[HANDED_ENV] = encode_taps(taps)
        ns.unshare(ns.CLONE_NEWNS | ns.CLONE_NEWIPC | ns.CLONE_NEWUTS | (ns.CLONE_NEWNET if jail.netns else 0))
        _build_root(str(JAIL_ROOTS / run.name), exposure, uid, gid, run.name)
        resource.setrlimit(resource.RLIMIT_NOFILE, (jail.nofile, jail.nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        ns.set_no_new_privs()
        from ..jail.landlock import restrict_to

        allowed = [*exposure.paths.items(), ("/dev", True), ("/proc", False), ("/tmp", True)]
        abi = restrict_to(allowed)
        print(f"pyvmm: jail: uid {uid}, gid {gid}; " + (f"Landlock ABI {abi}: confined to {len(allowed)} paths"
              if abi else "no Landlock in this kernel"), file=sys.stderr, flush=True)
        os.chdir(run.path)
        os.execv(sys.executable, [sys.executable, "-m", "pyvmm.manage.vmprocess", *vm_argv, "--jailed"])
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the keeper's code
        print(f"pyvmm: jail: {user_error_message(exc) if isinstance(exc, (UserError, OSError)) else repr(exc)}",
              file=sys.stderr, flush=True)
        os._exit(2)


def jail(run_dir: str, vm_argv: list[str], ready_fd: int | None) -> int:
    from ..jail.cgroups import Cgroup

    if os.geteuid() != 0:
        raise UserError("jail: the jailer needs root (namespaces, control groups, device nodes, another uid)")
    run = RunDir(Path(run_dir).resolve())
    document = json.loads(run.definition_file.read_text())
    restore_file = run.path / "restore.json"
    restore = json.loads(restore_file.read_text()) if restore_file.exists() else None
    jail = JailConfig.from_options(jail_options(document) or True)
    exposure = plan(document, run.path, restore, netns=jail.netns)
    JAIL_ROOTS.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(run.path.parent / ".jail.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        uid, gid = _allocate_ids(run, jail)
        (run.path / RECORD).write_text(json.dumps({"uid": uid, "gid": gid, "keeper_pid": os.getpid()}))
    memory_mib = jail.memory_mib or (document.get("machine-config") or {}).get("mem_size_mib", 256) + VMM_OVERHEAD_MIB
    networks = _make_networks(document)
    taps = [HandedTap(network.tap.fd, network.tap.name, network.netns) for network in networks]
    try:
        cgroup = Cgroup(run.name, cpus=jail.cpus, memory_bytes=memory_mib << 20, pids=jail.pids).create()
    except BaseException:
        for network in networks:
            network.close()
        raise
    previous = _hand_over([str(run.path), *exposure.owned], uid, gid)
    for entry in run.path.iterdir():
        if entry.name != RECORD:
            os.chown(entry, uid, gid)
    record = {"uid": uid, "gid": gid, "keeper_pid": os.getpid(), "cgroup": cgroup.describe(),
              "netns": jail.netns, "exposed": exposure.paths, "devices": exposure.devices,
              "networks": [{"tap": tap.name, "netns": tap.netns} for tap in taps]}
    try:
        ns.unshare(ns.CLONE_NEWPID)
        go, started = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(started)
            cgroup.add(0)   # 0: the writing process itself
            _enter(run, exposure, jail, uid, gid, vm_argv, go, taps)
        os.close(go)
        if ready_fd is not None:
            os.close(ready_fd)
        run.write_pid(child)
        (run.path / RECORD).write_text(json.dumps({**record, "pid": child}, indent=1))
        os.write(started, b"!")
        os.close(started)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for signum in (signal.SIGINT, signal.SIGTERM):   # whoever signals the keeper means the VM
            signal.signal(signum, lambda number, _frame: os.kill(child, number))
        _, status = os.waitpid(child, 0)
    finally:
        _give_back(previous)
        cgroup.remove()
        for network in networks:
            network.close()
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS and run.outcome() is None:
        message = f"the VM's process (pid {child}) {SECCOMP_KILLED}: SIGSYS ({SECCOMP_WHY})"
        print(f"pyvmm: {message}", file=sys.stderr, flush=True)
        run.write_outcome({"reason": "process-died", "status": 128 + signal.SIGSYS, "message": message,
                           "killed_by": "seccomp", "signal": "SIGSYS", "ended_at": time.time()})
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def build_parser(prog: str = "pyvmm jail") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="start a managed VM's process (its run directory "
                                     "holds definition.json) in a jail; [pyvmm] jail in the definition sets it up")
    parser.add_argument("run_dir")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--id")
    parser.add_argument("--incoming")
    return parser


def main(argv: list[str] | None = None, prog: str = "pyvmm jail") -> int:
    args = build_parser(prog).parse_args(argv)
    vm_argv = [args.run_dir]
    if args.ready_fd is not None:
        vm_argv += ["--ready-fd", str(args.ready_fd)]
    if args.id:
        vm_argv += ["--id", args.id]
    if args.incoming:
        vm_argv += ["--incoming", args.incoming]
    try:
        return jail(args.run_dir, vm_argv, args.ready_fd)
    except (UserError, OSError, ValueError) as exc:
        message = user_error_message(exc) if isinstance(exc, (UserError, OSError)) else str(exc)
        print(f"pyvmm: error: {message}", file=sys.stderr)
        if args.ready_fd is not None:
            try:
                os.write(args.ready_fd, f"error: {message}\n".encode())
            except OSError:
                pass
        return 2


def entry() -> int:
    """The `pyvmm-jailer` command."""
    return main(sys.argv[1:], prog="pyvmm-jailer")


if __name__ == "__main__":
    sys.exit(main())
