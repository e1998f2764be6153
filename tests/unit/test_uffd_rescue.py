"""The uffd handler process dies while a VMM thread holding the GIL touches a page it had not
loaded: uffd_rescue.c's thread (no GIL) loads the page from the memory file, so that thread goes
on and the monitor can report the handler's end (without it both waited for ever)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pyvmm.snapshot import uffd

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pyvmm.memory.guest_memory import RegionSpec
    from pyvmm.snapshot.uffd import lazy_memory

    path, size = sys.argv[1], 8 << 20
    pattern = bytes((i * 7 + 1) & 0xFF for i in range(4096))
    with open(path, "wb") as f:
        for page in range(size // 4096):
            f.write(page.to_bytes(4, "little") + pattern[4:])
    fd = os.open(path, os.O_RDONLY)
    memory, lazy = lazy_memory([RegionSpec(0, size)], [0], fd, prefetch=False)
    if lazy.rescue is None:
        print("NO-RESCUE")
        sys.exit(0)
    sys.setswitchinterval(60)  # this thread keeps the GIL: the monitor cannot run meanwhile
    os.kill(lazy.process.pid, signal.SIGKILL)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:  # (no call that lets the GIL go: the handler dies meanwhile)
        pass
    page = 1000
    data = memory.read(page * 4096, 4096)  # a fault only the rescue answers now
    sys.setswitchinterval(0.005)
    assert data == page.to_bytes(4, "little") + pattern[4:], data[:16]
    assert lazy.complete.wait(30), "the monitor never ran"
    print("LOADED", lazy.failure)
    memory.close()
""")


@pytest.fixture
def userfaultfd():
    try:
        uffd.check_available()
    except uffd.UffdUnavailable as exc:
        pytest.skip(str(exc))


def test_a_thread_holding_the_gil_gets_its_page_after_the_handler_died(userfaultfd, tmp_path):
    try:
        run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "memory")], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the VMM thread waited in its fault for ever (no rescue)")
    if run.stdout.startswith("NO-RESCUE"):
        pytest.skip("uffd_rescue is not built (scripts/compile) or PYVMM_COMPILED=0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("LOADED the userfaultfd handler (pid "), run.stdout
    assert "ended before guest RAM was loaded" in run.stdout
