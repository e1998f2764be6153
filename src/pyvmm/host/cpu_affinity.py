"""One host CPU for the threads of a software-CPU VM.

Such a VM is one Python interpreter whose threads take the GIL in turns: the thread that runs
the guest (Unicorn runs guest code without the GIL and calls back into Python, with it, for
every port and MMIO access, system call and interrupt), the I/O thread serving the devices
(a kick wakes it from the guest's thread, a completion wakes that thread back) and the slice
timer. Spread over two host CPUs, every turn one of them waits for is a wake-up across CPUs,
during which both stand still; on one CPU it is a context switch. The README (Benchmarks,
"One host CPU per software-CPU VM") has the figures: the rows with many small events (fio at
iodepth 32, iperf3, 4k dd, busybox nc) ran 1.4-5.7x faster on one host CPU than spread over two;
boot.py --unplaced measures what it costs a CPU-bound guest (2-3%).

So in a VM process (the CLI's `run`, a managed VM's process, the Firecracker launcher: their
entry points call `place_vm_threads()`, as they configure seccomp) the VM's threads are placed
on the host CPU its starting thread runs on (the kernel put it there: usually an idle one),
each thread placing itself as it starts; threads they start inherit the placement. Every such
VM of one process gets the same CPU: they share its GIL too. Library use (pyvmm.Sandbox,
build_vm in a program, the test suite) leaves its VMs' threads where the kernel puts them, as
it leaves its caller's process unfiltered. KVM VMs are left alone: their vCPUs run guest code
in the kernel, without the GIL. PYVMM_TCG_HOST_CPU=N picks CPU N (in any process), =any leaves
the threads where the kernel puts them (the behaviour before). A host that refuses (an
affinity mask that forbids the CPU) leaves them unplaced, logged.
"""

from __future__ import annotations

import logging
import os

from ..errors import ConfigError

log = logging.getLogger(__name__)

ENV = "PYVMM_TCG_HOST_CPU"
_PROCESSOR_FIELD = 39  # /proc/<pid>/task/<tid>/stat: the CPU the thread last ran on (proc(5))
_chosen: int | None = None  # the process's choice, once made
_vm_process = False  # an entry point called place_vm_threads()


def place_vm_threads() -> None:
    """Called by a VM process's entry point: its software-CPU VMs' threads share one host CPU."""
    global _vm_process
    _vm_process = True


def current_cpu() -> int | None:
    """The host CPU the calling thread is running on, or None where /proc does not say."""
    try:
        with open("/proc/thread-self/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return int(fields[_PROCESSOR_FIELD - 3])


def shared_cpu(environ=os.environ) -> int | None:
    """The host CPU for a software-CPU VM's threads, or None to leave them unplaced."""
    wanted = environ.get(ENV, "").strip()
    if wanted == "any":
        return None
    allowed = os.sched_getaffinity(0)
    if wanted:
        if not wanted.isdigit() or int(wanted) not in allowed:
            raise ConfigError(f"{ENV}={wanted}: not a host CPU this process may run on "
                              f"(allowed: {', '.join(map(str, sorted(allowed)))}; or 'any')")
        return int(wanted)
    global _chosen
    if len(allowed) < 2 or not _vm_process:
        return None  # nowhere else to go, or library use (see above)
    if _chosen not in allowed:
        cpu = current_cpu()
        _chosen = cpu if cpu in allowed else min(allowed)
    return _chosen


def place_calling_thread(cpu: int | None) -> None:
    """Run the calling thread (and the threads it starts later) on `cpu` only."""
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.info("cannot place a VM thread on host CPU %d (%s): it runs where the kernel puts it", cpu, exc.strerror)
