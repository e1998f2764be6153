"""Fixtures the device tests share."""

import shutil
import tempfile

import pytest

from pyvmm.iothread import IoThread


@pytest.fixture
def iothread():
    """A running I/O thread, stopped (and joined) after the test."""
    thread = IoThread(name="test-io")
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture
def sockdir():
    """A short directory for Unix sockets (their paths are limited to 108 bytes)."""
    path = tempfile.mkdtemp(prefix="pyvmm-sock-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
