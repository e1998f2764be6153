"""Managed VMs: the default Debian guest booted by `pyvmm start` in a process of its own (not
through `pyvmm run`, so not through tests/linux's fixture). The same kernel-warning gate
applies: definitions here ask for CONSOLE_LOGLEVEL and each test checks every VM's console
history with pyvmm.images.kernel_warnings before it ends."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def image():
    """The default guest image, built (downloaded from Debian) once per machine."""
    from pyvmm.images import default_image

    return default_image()
