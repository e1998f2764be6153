"""Managed VMs: the default Debian guest booted by `pyvmm start` in a process of its own (not
through `pyvmm run`, so not through tests/linux's fixture). The same kernel-warning gate
applies: definitions here ask for CONSOLE_LOGLEVEL and each test checks every VM's console
history with pyvmm.images.kernel_warnings before it ends.

`env` gives a test its own pyvmm host: private config and run directories (XDG_CONFIG_HOME,
XDG_RUNTIME_DIR) and the environment that points the CLI at them, with the Python client's
Host for the same directories. Nothing a test starts outlives it (helpers/managed.py)."""

from __future__ import annotations

import pytest
from helpers.managed import managed_env


@pytest.fixture(scope="session")
def image():
    """The default guest image, built (downloaded from Debian) once per machine."""
    from pyvmm.images import default_image

    return default_image()


@pytest.fixture
def env(tmp_path, image):
    yield from managed_env(tmp_path)
