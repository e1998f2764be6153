"""host/cpu_affinity.py: a software-CPU VM's threads on one host CPU, each placing itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from pyvmm.errors import ConfigError
from pyvmm.host import cpu_affinity

ALLOWED = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="placing threads needs two host CPUs to choose from")


def test_current_cpu_is_one_this_thread_may_run_on():
    assert cpu_affinity.current_cpu() in ALLOWED


@pytest.fixture
def vm_process(monkeypatch):
    """As in a VM process, whose entry point asked for placement."""
    monkeypatch.setattr(cpu_affinity, "_vm_process", True)


def test_library_use_places_nothing_unless_told(monkeypatch):
    monkeypatch.setattr(cpu_affinity, "_vm_process", False)
    assert cpu_affinity.shared_cpu({}) is None
    assert cpu_affinity.shared_cpu({cpu_affinity.ENV: str(ALLOWED[0])}) == ALLOWED[0]


@needs_two_cpus
def test_the_shared_cpu_is_an_allowed_one_unless_told_otherwise(vm_process):
    first = cpu_affinity.shared_cpu({})
    assert first in ALLOWED
    assert cpu_affinity.shared_cpu({}) == first  # every VM of the process: they share its GIL
    assert cpu_affinity.shared_cpu({cpu_affinity.ENV: "any"}) is None
    assert cpu_affinity.shared_cpu({cpu_affinity.ENV: str(ALLOWED[-1])}) == ALLOWED[-1]


@pytest.mark.parametrize("wanted", ["4096", "-1", "one", "0,1"])
def test_a_cpu_the_process_may_not_use_is_a_one_line_error(wanted):
    with pytest.raises(ConfigError, match=f"^{cpu_affinity.ENV}={wanted}: not a host CPU this process may run on"):
        cpu_affinity.shared_cpu({cpu_affinity.ENV: wanted})


@needs_two_cpus
def test_a_placed_thread_and_the_threads_it_starts_run_on_that_cpu_only_and_the_caller_is_left_alone():
    seen: dict[str, set[int]] = {}

    def child() -> None:
        seen["child"] = os.sched_getaffinity(0)

    def placed() -> None:
        cpu_affinity.place_calling_thread(ALLOWED[-1])
        seen["placed"] = os.sched_getaffinity(0)
        thread = threading.Thread(target=child)
        thread.start()
        thread.join()

    thread = threading.Thread(target=placed)
    thread.start()
    thread.join()
    assert seen == {"placed": {ALLOWED[-1]}, "child": {ALLOWED[-1]}}
    assert sorted(os.sched_getaffinity(0)) == ALLOWED
    cpu_affinity.place_calling_thread(None)  # nothing to do
    assert sorted(os.sched_getaffinity(0)) == ALLOWED


def test_under_the_process_filter_a_thread_may_place_itself_and_no_other():
    code = """
        import os, threading
        from pyvmm import seccomp
        seccomp.configure("kill")
        seccomp.install_process_filter()
        os.sched_setaffinity(0, os.sched_getaffinity(0))          # itself: allowed
        print("self ok", flush=True)
        os.sched_setaffinity(threading.get_native_id(), os.sched_getaffinity(0))  # by id: refused
        print("survived", flush=True)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGSYS, result
    assert "self ok" in result.stdout and "survived" not in result.stdout
