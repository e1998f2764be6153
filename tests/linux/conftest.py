"""A real Debian kernel and busybox initramfs, booted through `pyvmm run` on the accelerator
`auto` picks (the software CPU on hosts whose KVM emulates kernel code). Each test boots once
and checks several things.

Every boot goes through the `pyvmm` fixture (helpers/linux_guest.py), which fails the test on
any kernel warning the guest prints (pyvmm.images.kernel_warnings): a test that makes the
guest warn on purpose says which kinds with `@pytest.mark.kernel_warnings_expected(...)`."""

from __future__ import annotations

import pytest
from helpers.linux_guest import LinuxBoots


@pytest.fixture(scope="session")
def image():
    """The default guest image, built (downloaded from Debian) once per machine."""
    from pyvmm.images import default_image

    return default_image()


@pytest.fixture
def pyvmm(image, request):
    marker = request.node.get_closest_marker("kernel_warnings_expected")
    boots = LinuxBoots(marker.args if marker else ())
    yield boots
    boots.close()
