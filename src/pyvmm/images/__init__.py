"""Guest images: the default Linux guest, built from Debian packages.

``pyvmm image build`` downloads ``linux-image-cloud-amd64`` (resolved to the real
``linux-image-6.1.0-N-cloud-amd64``) and ``busybox-static`` with ``apt-get download``,
extracts them with ``dpkg-deb -x`` (nothing is installed on the host) and writes,
per user::

    $XDG_CACHE_HOME/pyvmm/images/default/     (default ~/.cache/pyvmm/images/default/)
        vmlinuz             the Debian bzImage, as shipped
        initramfs.cpio.gz   busybox + virtio modules + /init (see init.sh), deterministic bytes
        System.map          the kernel's symbols, read from its kallsyms tables (Debian's package
                            has a stub): names guest code in error messages
        manifest.json       packages and versions, sha256 of each artifact, build time, format

System.map is recorded apart from the artifacts (manifest key "symbols"), so images of
pyvmm versions that did not write one stay valid: it is added to them on first use.

The guest's /init loads the virtio/vsock modules, writes 0x01 to port 0x610 ("init
started"), then runs the command given as ``pyvmm.cmd=<base64>`` on the kernel command
line (see `encode_command`), prints ``pyvmm: exit status N``, writes N to port 0x611 and
powers off; without ``pyvmm.cmd=`` it starts a shell on the console.

The modules: image (the files, ImageError), command (pyvmm.cmd=), recipe (packages, /init,
the staleness hash), cache (GuestImage, finding a usable image), symbols (System.map),
build (building it; default_image), initramfs and modules (the initramfs's parts), debian
(apt-get download / dpkg-deb), cli (`pyvmm image`).

    >>> image = default_image()                    # builds on first use
    >>> image.kernel, image.initramfs
    >>> image.command_line(["uname", "-a"])        # 'console=ttyS0 ... pyvmm.cmd=dW5hbWUgLWE='
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .build import build_default_image, default_image
    from .cache import GuestImage, cache_root, cached_image, image_dir
    from .command import CMD_PARAM, MAX_CMD_PARAM, decode_command, encode_command
    from .image import DEFAULT_CMDLINE, FORMAT_VERSION, IMAGE_NAME, ImageError, print_to_stderr
    from .recipe import init_script

# loaded at first use (lazy_exports.py): `pyvmm run --kernel` and every other command that
# only registers `pyvmm image` (images.cli) need none of the builder's imports
_SOURCES = {
    "build_default_image": "build", "default_image": "build",
    "GuestImage": "cache", "cache_root": "cache", "cached_image": "cache", "image_dir": "cache",
    "CMD_PARAM": "command", "MAX_CMD_PARAM": "command", "decode_command": "command", "encode_command": "command",
    "DEFAULT_CMDLINE": "image", "FORMAT_VERSION": "image", "IMAGE_NAME": "image", "ImageError": "image",
    "print_to_stderr": "image",
    "init_script": "recipe",
}

__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
