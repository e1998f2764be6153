"""Make tests/helpers importable from every test directory, and keep the test process itself
out of seccomp's reach."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _test_process_unfiltered():
    """A test that calls pyvmm.cli.main in this process sets its seccomp mode (kill by default):
    put it back to off, so a later in-process VM does not load a filter into pytest (whose next
    subprocess would be killed by it). A filter loaded here cannot be taken off: fail at once."""
    from pyvmm import seccomp

    yield
    assert not seccomp.installed(), "a test loaded a seccomp filter into the test process"
    seccomp.configure("off")
