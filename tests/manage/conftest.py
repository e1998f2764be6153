"""Managed VMs: the default Debian guest booted by `pyvmm start` in a process of its own (not
through `pyvmm run`, so not through tests/linux's fixture). The same kernel-warning gate
applies: definitions here ask for CONSOLE_LOGLEVEL and each test checks every VM's console
history with pyvmm.images.kernel_warnings before it ends.

`env` gives a test its own pyvmm host: private config and run directories (XDG_CONFIG_HOME,
XDG_RUNTIME_DIR) and the environment that points the CLI at them, with the Python client's
Host for the same directories. Nothing a test starts outlives it (helpers/managed.py). When a
test fails, its report carries each VM's state, log tail and console tail (a CI run keeps no
other trace of a guest that crashed)."""

from __future__ import annotations

import pytest
from helpers.managed import describe_vms, managed_env


@pytest.fixture(scope="session")
def image():
    """The default guest image, built (downloaded from Debian) once per machine."""
    from pyvmm.images import default_image

    return default_image()


@pytest.fixture
def env(tmp_path, image):
    yield from managed_env(tmp_path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report gets what its VMs said, taken before the teardown stops them."""
    outcome = yield
    report = outcome.get_result()
    env_value = getattr(item, "funcargs", {}).get("env")
    if report.failed and env_value is not None:
        report.sections.append(("pyvmm VMs", describe_vms(env_value[1])))
