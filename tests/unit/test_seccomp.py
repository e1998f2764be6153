"""The seccomp allow-lists (pyvmm/seccomp): every name in them is a real system call, each kind's
filter compiles, and loaded filters do what the modes say, in child processes (a filter can
never be taken off the process that loads it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from pyvmm import seccomp
from pyvmm.seccomp import allowlist
from pyvmm.seccomp.libseccomp import ACT_KILL_PROCESS, syscall_number


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("kind", allowlist.KINDS)
def test_every_name_in_the_lists_is_a_system_call_and_the_filter_compiles(kind, tmp_path):
    for spawn in (False, True):
        for rule in allowlist.rules_for(kind, spawn=spawn):
            assert syscall_number(rule.syscall) is not None, rule.syscall
        with seccomp.build_filter(kind, spawn=spawn, default_action=ACT_KILL_PROCESS) as built:
            with open(tmp_path / f"{kind}.bpf", "wb") as out:
                built.export_bpf(out.fileno())
        assert (tmp_path / f"{kind}.bpf").stat().st_size > 8 * 10


def test_guest_facing_kinds_get_no_set_up_calls_and_no_process_creation():
    for kind in ("vcpu", "tcg", "io"):
        names = {rule.syscall for rule in allowlist.rules_for(kind)}
        assert not names & {"execve", "fork", "vfork", "bind", "listen", "mount", "memfd_create", "kill"}, kind
        clone = [rule for rule in allowlist.rules_for(kind) if rule.syscall == "clone"]
        assert clone and all(rule.conditions for rule in clone)          # threads only
        ioctls = allowlist.ioctls_for(kind)
        from pyvmm.kvm import ioctl_request

        assert ioctl_request("KVM_CREATE_VM") not in ioctls and ioctl_request("KVM_SET_USER_MEMORY_REGION") not in ioctls
    assert allowlist.ioctls_for("vcpu").keys() >= {allowlist._kvm({"KVM_RUN": ""}).popitem()[0]}
    assert not allowlist.ioctls_for("io").keys() & set(allowlist._kvm({"KVM_RUN": ""}))
    kvm_ioctls = {number for names in (allowlist.KVM_VM_DEVICE_IOCTLS, allowlist.KVM_VCPU_IOCTLS)
                  for number in allowlist._kvm(names)}
    assert not allowlist.ioctls_for("tcg").keys() & kvm_ioctls      # the software CPU has no KVM fd
    for kind in ("vcpu", "tcg", "io"):     # the terminal's mode is the main thread's business
        assert not allowlist.ioctls_for(kind).keys() & allowlist.TERMINAL_IOCTLS.keys(), kind
    assert allowlist.ioctls_for("process").keys() >= allowlist.TERMINAL_IOCTLS.keys()


def test_kill_mode_kills_the_process_on_a_call_outside_the_list():
    result = run_python("""
        import os
        from pyvmm import seccomp
        seccomp.configure("kill")
        seccomp.install_process_filter()
        print("installed", flush=True)
        os.chroot("/")
        print("survived", flush=True)
    """)
    assert result.returncode == -signal.SIGSYS, result
    assert "installed" in result.stdout and "survived" not in result.stdout


def test_log_mode_lets_the_call_through():
    result = run_python("""
        import os
        from pyvmm import seccomp
        seccomp.configure("log")
        seccomp.install_process_filter()
        os.chroot("/")
        print("survived", flush=True)
    """)
    assert result.returncode == 0 and "survived" in result.stdout, result


def test_a_thread_filter_stacks_threads_start_and_inet_sockets_are_refused_on_the_io_thread():
    result = run_python("""
        import socket, threading
        from pyvmm import seccomp
        seccomp.configure("kill")
        seccomp.install_process_filter()
        def io():
            seccomp.enter_thread("io", "vmm-io")
            socket.socketpair()                       # allowed: wake-ups
            socket.socket(socket.AF_UNIX).close()     # allowed: a vsock connection's host side
            timer = threading.Thread(target=lambda: None)   # clone3 -> ENOSYS -> clone(CLONE_THREAD)
            timer.start(); timer.join()
            print("io ok", flush=True)
            socket.socket(socket.AF_INET)             # refused
            print("survived", flush=True)
        thread = threading.Thread(target=io); thread.start(); thread.join()
    """)
    assert result.returncode == -signal.SIGSYS, result
    assert "io ok" in result.stdout and "survived" not in result.stdout


ARGUMENT_PROBES = {   # name: (the thread that tries: the I/O thread or the main one, the call)
    # a clone the kernel would refuse anyway (EINVAL), but with more than pthread_create's flags
    "clone_with_a_namespace": ("io", "libc.syscall(56, 0x00010000 | 0x00000800 | 0x00000100 | 0x20000000, 0, 0, 0, 0)"),
    "tgkill_of_another_process": ("io", "libc.syscall(234, parent, parent, 0)"),
    "setting_a_resource_limit": ("io", "resource.setrlimit(resource.RLIMIT_CORE, resource.getrlimit(resource.RLIMIT_CORE))"),
    "packet_socket": ("main", "socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"),
    "crypto_socket": ("main", "socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET)"),
}


@pytest.mark.parametrize("probe", ARGUMENT_PROBES)
def test_argument_filters_refuse_what_only_an_argument_tells_apart(probe):
    """Allowed calls with a forbidden argument: the process dies; the allowed forms run first."""
    where, call = ARGUMENT_PROBES[probe]
    result = run_python(f"""
        import ctypes, os, resource, signal, socket, threading
        from pyvmm import seccomp
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        seccomp.configure("kill")
        seccomp.install_process_filter()
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()      # migration's TCP
        def io():
            seccomp.enter_thread("io", "vmm-io")
            signal.pthread_kill(threading.main_thread().ident, 0)     # tgkill within the process
            resource.getrlimit(resource.RLIMIT_NOFILE)                # reading a limit
            timer = threading.Thread(target=lambda: None)             # pthread_create's clone
            timer.start(); timer.join()
            print("allowed ok", flush=True)
            if {where == "io"}:
                {call}
                print("survived", flush=True)
        thread = threading.Thread(target=io); thread.start(); thread.join()
        if {where == "main"}:
            {call}
            print("survived", flush=True)
    """)
    assert result.returncode == -signal.SIGSYS, result
    assert "allowed ok" in result.stdout and "survived" not in result.stdout


def test_the_mode_cannot_change_once_installed_and_bad_modes_are_one_line():
    result = run_python("""
        from pyvmm import seccomp
        from pyvmm.errors import UserError
        seccomp.configure("log")
        seccomp.install_process_filter()
        try:
            seccomp.configure("off")
        except UserError as exc:
            print("refused:", exc)
    """)
    assert "refused: seccomp is installed" in result.stdout, result
    with pytest.raises(seccomp.UserError, match="--seccomp must be one of kill, log, off"):
        seccomp.configure("strict")


def test_the_cli_refuses_a_bad_mode_in_one_line(monkeypatch):
    bad = subprocess.run([sys.executable, "-m", "pyvmm.cli", "run", "--demo", "--seccomp", "strict"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'strict'" in bad.stderr
    env_bad = subprocess.run([sys.executable, "-m", "pyvmm.cli", "run", "--demo"], capture_output=True, text=True,
                             timeout=60, env={**__import__("os").environ, "PYVMM_SECCOMP": "strict"})
    assert env_bad.returncode == 2, env_bad
    assert env_bad.stderr.strip().splitlines() == ["pyvmm: error: PYVMM_SECCOMP must be one of kill, log, off "
                                                   "(got 'strict')"]


def test_the_io_thread_may_make_itself_sched_batch_under_the_filters_and_nothing_else():
    result = run_python("""
        import os, threading
        from pyvmm import seccomp
        from pyvmm.iothread import IoThread
        seccomp.configure("kill")
        seccomp.install_process_filter()
        iothread = IoThread(yields=True)
        iothread.thread_init = lambda: seccomp.enter_thread("io", "vmm-io")
        iothread.start()
        def check():   # (the thread made itself SCHED_BATCH as it started: test_iothread.py)
            print("started", flush=True)
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))   # allowed
            print("batch ok", flush=True)
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))   # refused
            print("survived", flush=True)
        iothread.call_soon(check)
        threading.Event().wait(10)
    """)
    assert result.returncode == -signal.SIGSYS, result
    assert "started" in result.stdout and "batch ok" in result.stdout, result
    assert "survived" not in result.stdout


@pytest.mark.parametrize("call", ["os.memfd_create('ram')", "socket.socket(socket.AF_INET).close()",
                                  "socket.socket(socket.AF_UNIX).bind('')"])
def test_a_process_that_never_builds_again_has_no_set_up_calls(call):
    """`pyvmm run` without --reboot: memfd_create, TCP sockets, bind... are gone once its VM runs."""
    result = run_python(f"""
        import os, socket
        from pyvmm import seccomp
        seccomp.configure("kill", rebuilds=False)
        seccomp.install_process_filter()
        socket.socket(socket.AF_UNIX).close()
        print("allowed ok", flush=True)
        {call}
        print("survived", flush=True)
    """)
    assert result.returncode == -signal.SIGSYS, result
    assert "allowed ok" in result.stdout and "survived" not in result.stdout
    kept = run_python(f"""
        import os, socket
        from pyvmm import seccomp
        seccomp.configure("kill")
        seccomp.install_process_filter()
        {call}
        print("survived", flush=True)
    """)
    assert kept.returncode == 0 and "survived" in kept.stdout, kept


def test_the_default_mode_is_kill_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv(seccomp.ENV, raising=False)
    assert seccomp.default_mode() == "kill"
    monkeypatch.setenv(seccomp.ENV, "off")
    assert seccomp.default_mode() == "off"
    monkeypatch.setenv(seccomp.ENV, "bogus")
    with pytest.raises(seccomp.UserError, match="PYVMM_SECCOMP must be one of"):
        seccomp.default_mode()


def test_without_libseccomp_the_default_is_off_with_a_warning(monkeypatch, caplog):
    from pyvmm.seccomp import libseccomp

    def missing():
        raise libseccomp.SeccompUnavailable("seccomp needs libseccomp (apt-get install libseccomp2)")

    monkeypatch.delenv(seccomp.ENV, raising=False)
    monkeypatch.setattr(libseccomp, "library", missing)
    assert seccomp.default_mode() == "off"
    assert "needs libseccomp" in caplog.text
