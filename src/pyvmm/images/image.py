"""What a built guest image is: its files, its manifest's format, GuestImage, ImageError."""

from __future__ import annotations

import hashlib
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError

FORMAT_VERSION = 1
IMAGE_NAME = "default"
KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.cpio.gz"
SYSTEM_MAP_FILE = "System.map"
MANIFEST_FILE = "manifest.json"

DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"

Progress = Callable[[str], None]


class ImageError(UserError):
    """Building or finding a guest image failed; the message is one line for the user."""


def print_to_stderr(message: str) -> None:
    print(f"pyvmm: image: {message}", file=sys.stderr, flush=True)


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: what a VMM needs to boot it."""

    name: str
    directory: pathlib.Path
    kernel: pathlib.Path             # bzImage
    initramfs: pathlib.Path          # gzip-compressed newc cpio
    kernel_version: str              # uname -r in the guest, e.g. '6.1.0-56-cloud-amd64'
    packages: dict[str, str]         # Debian package -> version
    cmdline: str = DEFAULT_CMDLINE   # default kernel command line (console=ttyS0 ...)
    modules: tuple[str, ...] = ()    # modules init loads, in order
    system_map: pathlib.Path | None = None  # the kernel's System.map
    manifest: dict = field(default_factory=dict, compare=False, repr=False)

    def command_line(self, argv: list[str] | None = None, extra: str = "") -> str:
        """The default command line, plus `extra`, plus ``pyvmm.cmd=`` for `argv` if given."""
        parts = [self.cmdline]
        if extra:
            parts.append(extra)
        if argv:
            from .command import encode_command  # command.py raises ImageError from here

            parts.append(encode_command(argv))
        return " ".join(parts)
