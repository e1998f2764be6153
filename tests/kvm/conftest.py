"""Tiny guests on the host's /dev/kvm. On CI a missing KVM is a failure, not a skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyvmm.guests import build
from pyvmm.kvm import Kvm, KvmUnavailable


def _kvm_problem() -> str | None:
    try:
        Kvm().close()
    except KvmUnavailable as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(config, items):
    problem = _kvm_problem()
    if problem is None:
        return
    for item in items:
        if "tests/kvm" in str(item.fspath) and "[tcg" not in item.nodeid:
            if os.environ.get("CI"):
                raise pytest.UsageError(f"CI needs a usable KVM for tests/kvm: {problem}")
            item.add_marker(pytest.mark.skip(reason=f"no usable KVM here: {problem}"))


@pytest.fixture(scope="session")
def guest():
    return lambda name: str(build(name))


def run_pyvmm(*args: str, input: bytes | None = None, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    """`pyvmm ARGS` in a subprocess; stdout/stderr as text."""
    completed = subprocess.run(
        [sys.executable, "-m", "pyvmm.cli", *args],
        input=input if input is not None else b"",
        capture_output=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    completed.stdout = completed.stdout.decode(errors="replace")
    completed.stderr = completed.stderr.decode(errors="replace")
    return completed


@pytest.fixture
def pyvmm():
    return run_pyvmm


@pytest.fixture(params=["kvm", "tcg"])
def accel(request):
    """Parity: a test taking `accel` runs once per CPU backend, with the same expectations."""
    if request.param == "kvm":
        problem = _kvm_problem()
        if problem is not None:
            pytest.skip(f"no usable KVM here: {problem}")
    return request.param
