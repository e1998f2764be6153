"""What the default image is built from: the Debian packages, /init and the helpers; its hash
says when a cached image is stale."""

from __future__ import annotations

import hashlib
from importlib import resources

from .image import FORMAT_VERSION

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
KERNEL_PACKAGE_PATTERN = r"linux-image-[0-9][0-9.]*-[0-9]+-cloud-amd64(-unsigned)?"
BUSYBOX_PACKAGE = "busybox-static"


def init_script() -> bytes:
    """The guest's /init (package data init.sh)."""
    return resources.files(__package__).joinpath("init.sh").read_bytes()


def recipe_hash() -> str:
    """Everything that shapes the image besides the packages: a change means the cache is stale."""
    from .initramfs import OUTB_HELPER_CODE, agent_source, vsock_helper_source
    from .modules import DEFAULT_MODULES

    digest = hashlib.sha256()
    for part in (str(FORMAT_VERSION).encode(), init_script(), OUTB_HELPER_CODE, vsock_helper_source(), agent_source(),
                 "\n".join(DEFAULT_MODULES).encode(),
                 KERNEL_METAPACKAGE.encode(), BUSYBOX_PACKAGE.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()
