"""A built guest image's files and format version, ImageError, and the progress reports of a build."""

from __future__ import annotations

import pathlib
import sys
from typing import Callable

from .. import file_digests
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
    """The file's sha256, remembered across runs while the file is unchanged (file_digests.py)."""
    return file_digests.sha256_file(path)
