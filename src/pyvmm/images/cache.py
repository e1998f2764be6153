"""The per-user image cache: where images live, whether a cached one is complete and current,
and GuestImage, what a usable one gives a VMM."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

from ..user_cache import user_cache
from .command import encode_command
from .image import (DEFAULT_CMDLINE, FORMAT_VERSION, IMAGE_NAME, INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE,
                    SYSTEM_MAP_FILE, ImageError, sha256_file)
from .recipe import recipe_hash
from .symbols import symbols_state


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
            parts.append(encode_command(argv))
        return " ".join(parts)


def cache_root() -> pathlib.Path:
    return user_cache("images")


def image_dir(name: str = IMAGE_NAME) -> pathlib.Path:
    return cache_root() / name


def read_manifest(directory: pathlib.Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def check(directory: pathlib.Path, verify_hashes: bool = True) -> tuple[dict | None, str]:
    """(manifest, '') when `directory` holds a complete, current image; else (manifest or None, why not)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None, "no manifest"
    if manifest.get("format") != FORMAT_VERSION:
        return manifest, f"format {manifest.get('format')} != {FORMAT_VERSION}"
    if manifest.get("recipe") != recipe_hash():
        return manifest, "built by another version of pyvmm's image recipe"
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict) or set(artifacts) != {KERNEL_FILE, INITRAMFS_FILE}:
        return manifest, "manifest lists no artifacts"
    for file_name, meta in artifacts.items():
        path = directory / file_name
        try:
            size = path.stat().st_size
        except OSError:
            return manifest, f"{file_name} missing"
        if size != meta.get("size"):
            return manifest, f"{file_name} has the wrong size"
        if verify_hashes and sha256_file(path) != meta.get("sha256"):
            return manifest, f"{file_name} does not match its sha256"
    return manifest, ""


def image_from(directory: pathlib.Path, manifest: dict, verify_hashes: bool = True) -> GuestImage:
    return GuestImage(
        name=manifest.get("name", directory.name),
        directory=directory,
        kernel=directory / KERNEL_FILE,
        initramfs=directory / INITRAMFS_FILE,
        system_map=directory / SYSTEM_MAP_FILE if symbols_state(directory, manifest, verify_hashes) == "ok" else None,
        kernel_version=manifest["kernel_version"],
        packages=dict(manifest["packages"]),
        cmdline=manifest.get("cmdline", DEFAULT_CMDLINE),
        modules=tuple(manifest.get("modules", ())),
        manifest=manifest,
    )


def cached_image(name: str = IMAGE_NAME, verify_hashes: bool = True) -> GuestImage:
    """The cached image `name`, or ImageError saying why it cannot be used."""
    directory = image_dir(name)
    manifest, problem = check(directory, verify_hashes)
    if problem or manifest is None:
        raise ImageError(f"guest image {name!r} at {directory} is not usable ({problem}): run `pyvmm image build`")
    return image_from(directory, manifest, verify_hashes)
