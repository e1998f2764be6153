"""A real Debian kernel and busybox initramfs, booted through `pyvmm run` on the accelerator
`auto` picks (the software CPU on hosts whose KVM emulates kernel code). Boots cost tens of
seconds there: each test boots once and checks several things."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BOOT_TIMEOUT = 400


@pytest.fixture(scope="session")
def image():
    """The default guest image, built (downloaded from Debian) once per machine."""
    from pyvmm.images import default_image

    return default_image()


def run_pyvmm(*args: str, timeout: float = BOOT_TIMEOUT) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "pyvmm.cli", *args], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=timeout, env=dict(os.environ))
    completed.stdout = completed.stdout.decode(errors="replace").replace("\r\n", "\n")
    completed.stderr = completed.stderr.decode(errors="replace")
    return completed


@pytest.fixture
def pyvmm(image):
    return run_pyvmm
