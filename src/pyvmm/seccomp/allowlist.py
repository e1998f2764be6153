"""Every system call and ioctl a pyvmm VM process may make, per kind of thread, and why.

This is the one place to review (and extend) what seccomp lets through. A feature that needs
a new call adds it here, to the narrowest kind that needs it, with its reason (report.py lists
what log mode caught outside the lists; trace.py what each kind of thread called under strace).

Kinds of thread (README, "Isolation"):
- ``process``: the filter every thread of a VM process gets once the VM is set up (installed
  with TSYNC before the VM's threads start). The main thread, the API server, the console
  sockets and the control threads live under it, and they may build a machine again at any
  time (a reboot, a snapshot load, an incoming migration), so it holds set-up as well.
- ``vcpu``: a KVM vCPU thread (KVM_RUN, exits dispatched to the device models' registers).
- ``tcg``: the software CPU's scheduler thread (Unicorn runs the guest in it; device
  registers are served inline).
- ``io``: the I/O thread (virtqueues: disk, TAP, vsock and console sockets, entropy).
The three guest-facing kinds stack a tighter filter on top of ``process`` in their own
thread (without TSYNC), so a thread gets the intersection. Timer threads (the RTC's and the
software CPU's slice timer) start lazily from whichever thread arms them and inherit its
filters: every guest-facing kind may therefore create threads (clone with CLONE_THREAD),
never processes.

Python makes the set large: the interpreter allocates with mmap/brk, imports modules lazily
(open/read/stat on its own files), and releases the GIL with futexes, on every thread.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from .libseccomp import ArgCmp

# --- the interpreter itself: every thread -----------------------------------------------------
PYTHON_RUNTIME = {
    "read": "file descriptors: eventfds, pipes, sockets, files",
    "write": "file descriptors: eventfds, the console, logs",
    "readv": "vectored reads (sockets, TAP)",
    "writev": "vectored writes (sockets, TAP, logging)",
    "pread64": "disk images and module files at an offset",
    "pwrite64": "disk images at an offset",
    "preadv": "disk images: a request's buffers at an offset", "pwritev": "the same, writing",
    "preadv2": "the same (os.preadv on newer glibc)", "pwritev2": "the same, writing",
    "close": "closing file descriptors",
    "lseek": "file positions (imports, disk images)",
    "fstat": "os.fstat, imports",
    "newfstatat": "os.stat, imports",
    "statx": "os.stat on newer glibc",
    "openat": "lazy imports of pyvmm's and the standard library's modules",
    "getdents64": "the import system lists package directories",
    "readlink": "os.path.realpath in imports",
    "getcwd": "os.getcwd (import paths)",
    "fcntl": "O_NONBLOCK / FD_CLOEXEC on descriptors",
    "dup": "socket.dup, os.dup",
    "mmap": "the allocator (arenas), ctypes buffers",
    "munmap": "the allocator",
    "mprotect": "the allocator, ctypes closures",
    "mremap": "growing large buffers (bytearray, list)",
    "madvise": "the allocator returns memory; guest RAM discards (MADV_REMOVE, DONTNEED)",
    "brk": "the C allocator",
    "futex": "the GIL, locks, conditions, events",
    "set_robust_list": "thread start (glibc)",
    "rseq": "thread start (glibc)",
    "rt_sigprocmask": "threads block host signals (vm.py)",
    "rt_sigreturn": "returning from a signal handler (the vCPU kick)",
    "sigaltstack": "thread start and exit (CPython's faulthandler)",
    "restart_syscall": "a system call interrupted by a signal is restarted",
    "getpid": "os.getpid, logging",
    "gettid": "threading.get_native_id, logging",
    "clock_gettime": "time.monotonic/time.time (vDSO fallback)",
    "clock_nanosleep": "time.sleep",
    "nanosleep": "time.sleep (older glibc)",
    "sched_yield": "the GIL hand-off",
    "sched_getaffinity": "os.cpu_count in libraries",
    "getrandom": "random, uuid, hash seeds",
    "poll": "select.poll, socket timeouts",
    "ppoll": "select.poll on newer glibc",
    "select": "select.select",
    "pselect6": "select.select on newer glibc",
    "epoll_create1": "selectors.DefaultSelector (the I/O thread, servers)",
    "epoll_ctl": "selectors: registering descriptors",
    "epoll_wait": "selectors: waiting",
    "epoll_pwait": "selectors on newer glibc",
    "eventfd2": "wake-up eventfds (I/O thread, kicks)",
    "exit": "a thread ends",
    "exit_group": "the process ends",
    "getuid": "os.getuid (paths under $XDG_RUNTIME_DIR)",
    "geteuid": "os.geteuid",
    "getgid": "os.getgid",
    "getegid": "os.getegid",
    "uname": "platform queries in libraries",
    "sysinfo": "memory figures (os, stats)",
    "getrusage": "resource.getrusage (CPU time in stats)",
    "times": "os.times",
    "clock_getres": "time.get_clock_info",
    "fsync": "disk flushes (virtio-blk FLUSH)",
    "fdatasync": "disk flushes (virtio-blk FLUSH)",
    "fallocate": "virtio-blk DISCARD and WRITE_ZEROES punch holes",
    "sendto": "sockets: vsock and console host sides",
    "recvfrom": "sockets: vsock and console host sides",
    "sendmsg": "sockets: descriptors passed over Unix sockets (vhost-user)",
    "recvmsg": "sockets: descriptors passed over Unix sockets",
    "shutdown": "sockets: half-closing a vsock stream",
    "getsockopt": "sockets: SO_ERROR after a non-blocking connect",
    "setsockopt": "sockets: buffer sizes, SO_REUSEADDR",
    "getsockname": "sockets",
    "getpeername": "sockets",
    "pipe2": "wake-up pipes",
}

# Thread creation: Python starts threads with pthread_create, which glibc does with clone3
# (its flags are in memory no filter can read): it is answered ENOSYS, so glibc falls back to
# clone, whose flags are an argument: exactly pthread_create's (glibc's create_thread), so no
# new process, no namespace, no exit signal.
CLONE_THREAD = 0x00010000
PTHREAD_CLONE_FLAGS = (0x00000100 | 0x00000200 | 0x00000400 | 0x00000800   # CLONE_VM, _FS, _FILES, _SIGHAND
                       | CLONE_THREAD | 0x00040000 | 0x00080000             # _THREAD, _SYSVSEM, _SETTLS
                       | 0x00100000 | 0x00200000)                            # _PARENT_SETTID, _CHILD_CLEARTID
THREADS = [
    ("clone", "a new thread (a timer thread started lazily)", (ArgCmp(0, PTHREAD_CLONE_FLAGS),)),
]
ANSWERED_ENOSYS = {"clone3": errno.ENOSYS}

# The software CPU's I/O thread makes itself SCHED_BATCH as it starts (iothread.py), under the
# process filter: only that policy, only for the calling thread (it cannot raise a priority).
# Its VM's threads place themselves on one host CPU as they start (host/cpu_affinity.py):
# each only itself.
SCHED_BATCH = 3
SCHEDULING = [
    ("sched_setscheduler", "the I/O thread yields to the guest's thread (SCHED_BATCH, itself only)",
     (ArgCmp(0, 0, 0xFFFFFFFF), ArgCmp(1, SCHED_BATCH, 0xFFFFFFFF))),
    ("sched_setaffinity", "a software-CPU VM's threads share one host CPU (each places itself only)",
     (ArgCmp(0, 0, 0xFFFFFFFF),)),
]

# Signals to threads: kicking a vCPU thread out of KVM_RUN (and raise()): only this process's
# threads (tgkill's first argument is the process id; a process with helpers leaves it open,
# the filter being inherited by its children).
SIGNALLING = "tgkill"

# Sockets of the process-wide list, by family: Unix (API, console, vsock, vhost-user, the uffd
# handler) and TCP over IPv4/IPv6 (migration); netlink only for `ip` where helpers run. No
# packet, raw-netlink, crypto (AF_ALG) or other families: the kernel's code for them is out of reach.
PROCESS_SOCKET_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
SPAWN_SOCKET_FAMILIES = (socket.AF_NETLINK,)

# Installing a thread's own filter (libseccomp: prctl(PR_SET_NO_NEW_PRIVS), then seccomp()),
# and naming the thread for the kernel's log: prctl is filtered by its option.
PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 15, 16, 38, 39
FILTERING = [
    ("seccomp", "stacking a thread's own filter (it can only narrow what the thread may do)", ()),
    *[("prctl", why, (ArgCmp(0, option),)) for option, why in (
        (PR_SET_NAME, "naming the thread"), (PR_GET_NAME, "reading its name"),
        (PR_SET_NO_NEW_PRIVS, "libseccomp sets it before loading a filter"),
        (PR_GET_NO_NEW_PRIVS, "libseccomp checks it"))],
]

# Sockets a guest-facing thread may create: Unix sockets only (a guest's vsock connection to
# host port P connects to the Unix socket UDS_P).
UNIX_SOCKETS = [
    ("socket", "a vsock connection's host side (AF_UNIX)", (ArgCmp(0, socket.AF_UNIX, 0xFFFFFFFF),)),
    ("connect", "a vsock connection's host side connects to UDS_P", ()),
    ("socketpair", "socket.socketpair (wake-ups)", ()),
]

# --- ioctl(2), filtered by request number (the low 32 bits: the kernel's `unsigned int cmd`) ---
KVM_SYSTEM_IOCTLS = {  # on /dev/kvm: set-up
    "KVM_GET_API_VERSION": "checking the KVM API", "KVM_CREATE_VM": "a VM (a reboot builds a new one)",
    "KVM_GET_MSR_INDEX_LIST": "the MSRs to save", "KVM_CHECK_EXTENSION": "capabilities",
    "KVM_GET_VCPU_MMAP_SIZE": "the kvm_run page", "KVM_GET_SUPPORTED_CPUID": "the CPUID policy",
}
KVM_VM_SETUP_IOCTLS = {  # on a VM fd: set-up, snapshots, migration (process-wide only)
    "KVM_CREATE_VCPU": "vCPUs (also hot-added ones)", "KVM_SET_USER_MEMORY_REGION": "guest RAM slots",
    "KVM_SET_TSS_ADDR": "x86 set-up", "KVM_SET_IDENTITY_MAP_ADDR": "x86 set-up",
    "KVM_CREATE_IRQCHIP": "the in-kernel irqchip", "KVM_CREATE_PIT2": "the in-kernel PIT",
    "KVM_GET_IRQCHIP": "save", "KVM_SET_IRQCHIP": "restore", "KVM_GET_PIT2": "save", "KVM_SET_PIT2": "restore",
    "KVM_GET_CLOCK": "pause and save (kvm-clock)", "KVM_SET_CLOCK": "resume and restore",
    "KVM_ENABLE_CAP": "capabilities", "KVM_GET_DIRTY_LOG": "dirty-page tracking (snapshots, migration)",
    "KVM_GET_STATS_FD": "binary stats (domstats)",
}
KVM_VM_DEVICE_IOCTLS = {  # on a VM fd: what device emulation does while the guest runs
    "KVM_IRQ_LINE": "a device raises a GSI", "KVM_IRQ_LINE_STATUS": "a device raises a GSI",
    "KVM_SIGNAL_MSI": "an MSI without an irqfd", "KVM_SET_GSI_ROUTING": "the guest programs MSI-X vectors",
    "KVM_IRQFD": "MSI-X vectors as irqfds", "KVM_IOEVENTFD": "the guest enables a virtqueue (its kick)",
}
KVM_VCPU_IOCTLS = {  # on a vCPU fd
    "KVM_RUN": "running the guest", "KVM_GET_REGS": "exits and assists", "KVM_SET_REGS": "exits and assists",
    "KVM_GET_SREGS": "exits and assists", "KVM_SET_SREGS": "boot and restore", "KVM_TRANSLATE": "assists; pyvmm mem translate (api/memory.py)",
    "KVM_GET_MSRS": "save", "KVM_SET_MSRS": "boot and restore", "KVM_GET_FPU": "save",
    "KVM_SET_FPU": "boot and restore", "KVM_GET_LAPIC": "save", "KVM_SET_LAPIC": "boot and restore",
    "KVM_SET_CPUID2": "the CPUID policy", "KVM_GET_CPUID2": "save", "KVM_GET_MP_STATE": "save",
    "KVM_SET_MP_STATE": "restore", "KVM_GET_VCPU_EVENTS": "assists and save",
    "KVM_SET_VCPU_EVENTS": "assists inject exceptions", "KVM_SET_TSC_KHZ": "restore", "KVM_GET_TSC_KHZ": "the TSC rate",
    "KVM_GET_XSAVE": "save", "KVM_GET_XSAVE2": "save", "KVM_SET_XSAVE": "restore", "KVM_GET_XCRS": "save",
    "KVM_SET_XCRS": "restore", "KVM_GET_DEBUGREGS": "save", "KVM_SET_DEBUGREGS": "restore",
    "KVM_KVMCLOCK_CTRL": "pause", "KVM_GET_STATS_FD": "binary stats",
}
DESCRIPTOR_IOCTLS = {   # any thread: Python's file and socket objects
    0x5401: "TCGETS: isatty (open() asks it of every file it buffers)",
    0x5421: "FIONBIO: non-blocking sockets", 0x5451: "FIOCLEX: close-on-exec", 0x5450: "FIONCLEX",
    0x541B: "FIONREAD: bytes waiting on a socket",
}
TERMINAL_IOCTLS = {     # the main thread only: the console's terminal (console.py), set raw and back
    0x5402: "TCSETS: the console's raw mode", 0x5403: "TCSETSW", 0x5404: "TCSETSF: raw mode with a flush",
    0x5413: "TIOCGWINSZ: terminal size",
}


def _tun_ioctls() -> dict[int, str]:
    from ..net import tap

    return {tap.TUNSETIFF: "TUNSETIFF: attach a TAP", tap.TUNGETFEATURES: "TUNGETFEATURES: TAP features",
            tap.TUNSETVNETHDRSZ: "TUNSETVNETHDRSZ: the vnet header", tap.TUNSETOFFLOAD: "TUNSETOFFLOAD: the "
            "offloads the guest accepts (also when its driver negotiates features)"}


def _memory_ioctls() -> dict[int, str]:
    from ..memory import userfaultfd as uffd
    from ..net import vhost

    return {uffd.USERFAULTFD_IOC_NEW: "a userfaultfd from /dev/userfaultfd", uffd.UFFDIO_API: "userfaultfd",
            uffd.UFFDIO_REGISTER: "userfaultfd", uffd.UFFDIO_UNREGISTER: "userfaultfd", uffd.UFFDIO_WAKE: "userfaultfd",
            uffd.UFFDIO_COPY: "userfaultfd", uffd.UFFDIO_ZEROPAGE: "userfaultfd",
            uffd.UFFDIO_WRITEPROTECT: "dirty tracking (write protection)", uffd.PAGEMAP_SCAN: "dirty tracking",
            vhost.VHOST_GET_FEATURES: "checking for vhost-net"}


def _kvm(names: dict[str, str]) -> dict[int, str]:
    from ..kvm import ioctl_request

    return {ioctl_request(name): f"{name}: {why}" for name, why in names.items()}


def ioctls_for(kind: str, *, rebuilds: bool = True) -> dict[int, str]:
    """The ioctl request numbers a kind of thread may issue, with why (`rebuilds`: see REBUILD_ONLY)."""
    allowed = dict(DESCRIPTOR_IOCTLS)
    if kind != "tcg":   # the software CPU's thread has no KVM descriptor to use
        allowed.update(_kvm(KVM_VM_DEVICE_IOCTLS))
    allowed.update(_kvm(KVM_VCPU_IOCTLS) if kind in ("process", "vcpu") else {})
    if kind in ("process", "io", "vcpu", "tcg"):
        allowed.update(_tun_ioctls())   # offloads change when the guest's driver negotiates
    if kind == "process":
        allowed.update(TERMINAL_IOCTLS)
        if rebuilds:
            allowed.update(_kvm(KVM_SYSTEM_IOCTLS))
            allowed.update(_kvm(KVM_VM_SETUP_IOCTLS))
        allowed.update(_memory_ioctls())   # a restored VM's pages arrive through userfaultfd after it starts
    return allowed


# --- what only the process-wide filter holds: set-up at any time, control, sockets -------------
PROCESS = {
    "access": "checking files (kernels, images, /dev/kvm)",
    "faccessat2": "os.access on newer glibc",
    "mkdir": "run directories", "mkdirat": "run directories",
    "unlink": "removing sockets and temporary files", "unlinkat": "the same",
    "rename": "atomic record files (outcome.json)", "renameat2": "the same",
    "link": "a listening socket's file appears once it listens (host/streams.py)", "linkat": "the same",
    "rmdir": "runtime directories",
    "ftruncate": "sizing guest RAM (memfd) and memory files",
    "memfd_create": "guest RAM (a reboot or a restore maps new RAM)",
    "copy_file_range": "clones copy disk images",
    "sendfile": "copying files",
    "flock": "image locking (disks), the warm snapshot's lock",
    "statfs": "file system figures",
    "fstatfs": "file system figures",
    "chmod": "the API socket's mode", "fchmod": "the same", "fchmodat": "the same",
    "utimensat": "touching records",
    "umask": "creating sockets and files",
    "connect": "clients: vhost-user back-ends, the uffd handler, migration",
    "bind": "the API, console, vsock and migration listeners",
    "listen": "the same",
    "socketpair": "the uffd handler's channel",
    "mincore": "resident guest RAM (stats), sparse memory files",
    "userfaultfd": "the userfaultfd restore mode and dirty tracking",
    "rt_sigaction": "signal handlers (SIGTERM, the vCPU kick) installed at set-up",
    "kill": "stopping helper processes (the uffd handler)",
    "wait4": "reaping helper processes",
    "waitid": "the same",
    "pidfd_open": "waiting for a process", "pidfd_send_signal": "the same",
    "mbind": "a NUMA guest's RAM bound to host nodes when the machine is built (host/numa.py)",
    "sync_file_range": "a snapshot's memory file: its disk writes started while the rest is copied",
    "prlimit64": "resource limits (read and set)",
    # what a guest-facing kind needs must be here too: a thread's filters stack (intersection)
    "accept4": "the vsock and console listeners accept host clients (I/O and console threads)",
    "membarrier": "Unicorn's translation cache (RCU) on the software CPU",
}

# Set-up only: what building a machine needs (a reboot, a snapshot load, an incoming migration,
# a hot-added vCPU or device). A process that never builds again after its VM started (`pyvmm
# run` without --reboot) has none of it, nor TCP sockets, in its process-wide filter.
REBUILD_ONLY = {"memfd_create", "mbind", "bind", "listen", "mkdir", "mkdirat", "userfaultfd", "copy_file_range"}

# Only where the machine makes helper processes after set-up: a NIC with tap=auto makes and
# removes its network namespace with `ip` at each boot and at the end (net/netns.py).
SPAWN = {
    "vfork": "subprocess (posix_spawn)", "fork": "subprocess", "execve": "running `ip`",
    "unshare": "the network namespace (a helper thread)", "setns": "joining it to open the TAP",
    "mount": "`ip netns` bind-mounts", "umount2": "the same",
    "prctl": "`ip` (a child inherits the filter) reads its capabilities",
    "close_range": "subprocess's child closes descriptors before exec", "dup2": "the child's stdio",
    "dup3": "the same", "arch_prctl": "`ip` starting (thread-local storage)", "set_tid_address": "the same",
}

# Extra calls of a guest-facing kind, beyond the Python runtime.
VCPU = {
    "ioctl": "filtered by request number (ioctls_for)",
    "sched_setaffinity": "a NUMA guest's vCPU thread pins itself to its host node's CPUs (host/numa.py)",
}
TCG = {
    "ioctl": "filtered by request number: TAP offloads, FIONBIO (no KVM ioctl)",
    "sched_setaffinity": "the same for the software CPU's thread",
    "membarrier": "Unicorn's translation cache (RCU)",
}
IO = {
    "ioctl": "filtered by request number: TAP offloads, FIONBIO",
    "accept4": "the vsock listeners accept host clients",
}
# Guest-facing threads may read their resource limits, never set them (prlimit64's new_limit NULL).
READ_ONLY_LIMITS = ("prlimit64", "resource.getrlimit", (ArgCmp(2, 0),))


@dataclass(frozen=True)
class Rule:
    syscall: str
    conditions: tuple[ArgCmp, ...] = ()


def rules_for(kind: str, *, spawn: bool = False, pid: int | None = None, rebuilds: bool = True) -> list[Rule]:
    """The allow rules of one kind of thread ('process', 'vcpu', 'tcg' or 'io'); `pid`: the
    process the filter is for (its threads are the only ones it may signal); `rebuilds`: the
    process may build a machine again after it started one (REBUILD_ONLY)."""
    names = dict(PYTHON_RUNTIME)
    if kind == "process":
        names.update(PROCESS)
        if spawn:
            names.update(SPAWN)
        if not rebuilds:
            names = {name: why for name, why in names.items() if name not in REBUILD_ONLY}
    else:
        names.update({"vcpu": VCPU, "tcg": TCG, "io": IO}[kind])
    names.pop("ioctl", None)
    rules = [Rule(name) for name in sorted(names)]
    if kind == "process" and spawn:
        rules.append(Rule("clone"))  # subprocess's children too
    else:
        rules += [Rule(name, conditions) for name, _why, conditions in THREADS]
    rules += [Rule(name, conditions) for name, _why, conditions in FILTERING]
    if kind in ("process", "io"):
        rules += [Rule(name, conditions) for name, _why, conditions in SCHEDULING]
    if kind != "process":
        rules += [Rule(name, conditions) for name, _why, conditions in (*UNIX_SOCKETS, READ_ONLY_LIMITS)]
    else:
        families = (PROCESS_SOCKET_FAMILIES if rebuilds else (socket.AF_UNIX,)) + (SPAWN_SOCKET_FAMILIES if spawn else ())
        rules += [Rule("socket", (ArgCmp(0, family, 0xFFFFFFFF),)) for family in families]
    rules.append(Rule(SIGNALLING, () if pid is None or (kind == "process" and spawn) else (ArgCmp(0, pid),)))
    rules += [Rule("ioctl", (ArgCmp(1, number, 0xFFFFFFFF),)) for number in sorted(ioctls_for(kind, rebuilds=rebuilds))]
    return rules


KINDS = ("process", "vcpu", "tcg", "io")
