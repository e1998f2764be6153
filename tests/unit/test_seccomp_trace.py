"""pyvmm.seccomp.trace: strace -ff output read per VM process and thread name, only after the
process-wide filter went in, and only for processes that loaded one."""

from __future__ import annotations

from pyvmm.seccomp.trace import main, summarize

MAIN = """\
1.000 execve("/usr/bin/python", ["python"], 0x0 /* 1 var */) = 0
1.100 openat(AT_FDCWD, "/lib/libc.so.6", O_RDONLY|O_CLOEXEC) = 3
1.200 seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, 0x1) = 0
1.300 clone(child_stack=0x1, flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM) = 101
1.400 socket(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC, 0) = 4
"""
IO_THREAD = """\
1.310 prctl(PR_SET_NAME, "vmm-io") = 0
1.320 ioctl(5, FIONBIO, [1]) = 0
1.330 clone(child_stack=0x2, flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM) = 102
"""
TIMER = "1.340 futex(0x1, FUTEX_WAIT, 0, NULL) = 0\n"
UNFILTERED = "2.000 execve(\"/bin/ip\", [\"ip\"], 0x0) = 0\n2.100 socket(AF_NETLINK, SOCK_RAW, 0) = 3\n"


def test_calls_are_grouped_by_thread_name_after_the_filter(tmp_path, capsys):
    for tid, text in ((100, MAIN), (101, IO_THREAD), (102, TIMER), (200, UNFILTERED)):
        (tmp_path / f"t.{tid}").write_text(text)
    seen = summarize(tmp_path)
    assert set(seen) == {"main", "vmm-io", "other"}               # pid 200 never loaded a filter
    assert set(seen["main"]["calls"]) == {"seccomp", "clone", "socket"}   # nothing from before it
    assert seen["main"]["arguments"]["socket:AF_UNIX"] == 1
    assert set(seen["vmm-io"]["calls"]) == {"prctl", "ioctl", "clone"}
    assert seen["vmm-io"]["arguments"]["ioctl:FIONBIO"] == 1
    assert set(seen["other"]["calls"]) == {"futex"}               # the I/O thread's timer thread
    assert main([str(tmp_path)]) == 0
    assert "vmm-io: clone ioctl prctl" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
