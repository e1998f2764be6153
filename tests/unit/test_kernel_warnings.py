"""The kernel-warning gate: each pattern matches the line the kernel really prints, and an
ordinary boot of the default guest (its whole dmesg and its console) trips none of them."""

from __future__ import annotations

import pathlib

import pytest

from pyvmm.images.kernel_warnings import KINDS, KernelWarning, describe, find_kernel_warnings, oops_lines

ORDINARY_BOOT = pathlib.Path(__file__).parent / "data" / "ordinary_linux_boot.txt"

# As Linux 6.1 prints them (the function that prints each in brackets). The RCU and soft-lockup
# lines are the ones the guest printed on a 2599.998 MHz host before CPUID 0x15 was fixed
# (issue 11); the panic and its call trace come from `echo c > /proc/sysrq-trigger` in the
# default guest.
REAL_LINES = [
    ("rcu stall", "[   45.103211] rcu: INFO: rcu_preempt self-detected stall on CPU"),  # print_cpu_stall
    ("rcu stall", "[   63.107640] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"),  # print_other_cpu_stall
    ("rcu stall", "[   12.402012] rcu: INFO: rcu_preempt detected expedited stalls on CPUs/tasks: "
                  "{ 1-... } 21 jiffies s: 53 root: 0x2/."),  # synchronize_rcu_expedited_wait
    ("rcu stall", "[   63.129473] rcu: rcu_preempt kthread starved for 10502 jiffies! g1317 f0x0 "
                  "RCU_GP_WAIT_FQS(5) ->state=0x0 ->cpu=0"),  # rcu_check_gp_kthread_starvation
    ("rcu stall", "[   63.110234] rcu: rcu_preempt kthread timer wakeup didn't happen for 11205 jiffies! "
                  "g1317 f0x0 RCU_GP_WAIT_FQS(5) ->state=0x402"),  # rcu_check_gp_kthread_expired_fqs_timer
    ("soft lockup", "[   52.000012] watchdog: BUG: soft lockup - CPU#0 stuck for 42s! [swapper/0:1]"),  # watchdog_timer_fn
    ("hard lockup", "[  120.004411] NMI watchdog: Watchdog detected hard LOCKUP on cpu 1"),  # watchdog_overflow_callback
    ("BUG", "[    3.141592] BUG: kernel NULL pointer dereference, address: 0000000000000008"),  # page_fault_oops
    ("BUG", "[    7.300000] BUG: scheduling while atomic: swapper/0/0/0x00000002"),  # __schedule_bug
    ("BUG", "[    7.400000] kernel BUG at mm/slub.c:379!"),  # BUG() -> report_bug
    ("WARNING", "[    2.718281] WARNING: CPU: 0 PID: 1 at kernel/time/clocksource.c:404 "
                "clocksource_watchdog+0x3a6/0x4e0"),  # __warn
    ("Oops", "[    3.141700] Oops: 0002 [#1] PREEMPT SMP NOPTI"),  # __die_header
    ("call trace", "[    1.578937] Call Trace:"),  # show_trace_log_lvl
    ("general protection", "[    4.000001] general protection fault, probably for non-canonical address "
                           "0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI"),  # exc_general_protection
    ("general protection", "[    4.500000] traps: sh[87] general protection fault ip:4a1b2c sp:7ffd8c0e1a40 "
                           "error:0 in busybox[401000+a1000]"),  # gp_user_force_sig_segv
    ("invalid opcode", "[    7.400100] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI"),  # do_error_trap -> die
    ("invalid opcode", "[    8.000000] traps: sh[90] trap invalid opcode ip:4a1b2c sp:7ffd8c0e1a40 error:0 in "
                       "busybox[401000+a1000]"),  # do_trap -> show_signal
    ("segfault", "[    5.000000] sh[88]: segfault at 0 ip 00000000004a1b2c sp 00007ffd6f1e8a40 error 6 in "
                 "busybox[401000+a1000] likely on CPU 0 (core 0, socket 0)"),  # show_signal_msg
    ("hung task", "[  242.000000] INFO: task kworker/u4:1:35 blocked for more than 120 seconds."),  # check_hung_task
    ("TSC unstable", "[   10.000000] tsc: Marking TSC unstable due to clocksource watchdog"),  # mark_tsc_unstable
    ("clocksource unstable", "[   10.000000] clocksource: timekeeping watchdog on CPU0: Marking clocksource "
                             "'tsc' as unstable because the skew is too large:"),  # clocksource_watchdog
    ("kernel panic", "[    1.577607] Kernel panic - not syncing: sysrq triggered crash"),  # panic
]


@pytest.mark.parametrize("kind, line", REAL_LINES, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(REAL_LINES)])
def test_each_pattern_matches_the_line_the_kernel_prints(kind, line):
    assert find_kernel_warnings(line) == [KernelWarning(kind, line)]


def test_every_kind_has_a_real_line():
    assert {kind for kind, _ in REAL_LINES} == set(KINDS)


def test_an_ordinary_boot_trips_nothing():
    text = ORDINARY_BOOT.read_text()
    assert len(text.splitlines()) > 250  # a whole boot, not a stub
    assert find_kernel_warnings(text) == []


def test_a_warning_in_the_middle_of_command_output_is_found():
    # a kernel line need not start a console line: it lands where the serial output was
    console = ("pyvmm: accelerator tcg: ...\n6.1.0-57-cloud-amd64[   45.10] rcu: INFO: rcu_preempt self-detected "
               "stall on CPU\r\n2\r\npyvmm: exit status 0\r\n")
    assert find_kernel_warnings(console.encode()) == [
        KernelWarning("rcu stall", "6.1.0-57-cloud-amd64[   45.10] rcu: INFO: rcu_preempt self-detected stall on CPU")]


def test_expected_kinds_pass_and_only_they():
    panic = "[ 1.5] Kernel panic - not syncing: sysrq triggered crash\n[ 1.6] Call Trace:\n"
    assert find_kernel_warnings(panic, expected=["kernel panic", "call trace"]) == []
    assert [w.kind for w in find_kernel_warnings(panic, expected=["kernel panic"])] == ["call trace"]
    # a line that also matches an unexpected kind still fails
    lockup = "[ 52.0] watchdog: BUG: soft lockup - CPU#0 stuck for 42s! [sh:1]"
    assert [w.kind for w in find_kernel_warnings(lockup, expected=["soft lockup"])] == ["BUG"]
    with pytest.raises(ValueError, match="unknown kernel warning kinds"):
        find_kernel_warnings("", expected=["panic"])


def test_describe_names_each_line_and_stops_at_the_limit():
    warnings = [KernelWarning("BUG", f"[ {i}.0] BUG: something {i}") for i in range(12)]
    text = describe(warnings, limit=3)
    assert text.splitlines() == ["the guest kernel printed 12 warning line(s):", "  BUG: [ 0.0] BUG: something 0",
                                 "  BUG: [ 1.0] BUG: something 1", "  BUG: [ 2.0] BUG: something 2",
                                 "  ... and 9 more"]


def test_an_oops_is_named_by_its_bug_rip_and_first_frames():
    console = "\r\n".join([
        "[    2.0] some line before",
        "[    2.0] BUG: kernel NULL pointer dereference, address: 0000000000000102",
        "[    2.0] #PF: supervisor read access in kernel mode",
        "[    2.0] RIP: 0010:some_handler+0x1a/0x90",
        "[    2.0] RSP: 0018:ffffc90000003e48 EFLAGS: 00010046",
        "[    2.0] Call Trace:",
        "[    2.0]  <IRQ>",
        "[    2.0]  caller_one+0x10/0x20",
        "[    2.0]  caller_two+0x10/0x20",
        "[    2.0]  caller_three+0x10/0x20",
        "[    2.0]  not_kept+0x10/0x20",
        "[    2.0] CR2: 0000000000000102",
        "[    2.0] Kernel panic - not syncing: Fatal exception in interrupt"])
    assert oops_lines(console.encode(), frames=4) == [
        "[    2.0] BUG: kernel NULL pointer dereference, address: 0000000000000102",
        "[    2.0] RIP: 0010:some_handler+0x1a/0x90",
        "[    2.0]  <IRQ>", "[    2.0]  caller_one+0x10/0x20", "[    2.0]  caller_two+0x10/0x20",
        "[    2.0]  caller_three+0x10/0x20",
        "[    2.0] Kernel panic - not syncing: Fatal exception in interrupt"]
    assert oops_lines("[ 1.0] Run /init as init process\n") == []
