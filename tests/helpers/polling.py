"""Waiting, bounded, for what another thread does (a device's I/O thread, a C ring thread)."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 5.0) -> None:
    """Return once predicate() is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)
