"""`pyvmm image build [--rebuild]`, `pyvmm image rootfs [--output PATH]` and `pyvmm image info [--json]`.

Wired into pyvmm/cli.py by two lines: ``register_cli(sub)`` in build_parser and
``if args.command == "image": return run_image_command(args)`` in main.  This module
imports nothing heavy; the build code loads when a command runs.  Errors are
ImageError (a UserError): main prints them as one line.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register_cli", "run_image_command"]


def register_cli(subparsers) -> argparse.ArgumentParser:
    image = subparsers.add_parser("image", help="build or describe the default Linux guest image")
    actions = image.add_subparsers(dest="image_command", metavar="ACTION")
    build = actions.add_parser("build", help="download Debian's cloud kernel and busybox, build the initramfs")
    build.add_argument("--rebuild", action="store_true", help="build again even if the cached image is complete")
    build.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    rootfs = actions.add_parser("rootfs", help="build a Debian root filesystem image (ext4) for --root-disk")
    rootfs.add_argument("--output", "-o", metavar="PATH", help="write a fresh copy of it to PATH (sparse)")
    rootfs.add_argument("--rebuild", action="store_true", help="build again even if the cached one is current")
    rootfs.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    info = actions.add_parser("info", help="where the default image is, its versions, sizes and command line")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    image.set_defaults(handler=run_image_command, image_parser=image)
    return image


def run_image_command(args: argparse.Namespace) -> int:
    from . import build_default_image, cached_image, print_to_stderr

    action = getattr(args, "image_command", None)
    if action == "build":
        image = build_default_image(rebuild=args.rebuild, progress=None if args.quiet else print_to_stderr)
        _print_info(image)
        return 0
    if action == "rootfs":
        from .rootfs import new_root_disk, rootfs_image

        progress = None if args.quiet else print_to_stderr
        template = rootfs_image(rebuild=args.rebuild, progress=progress)
        print(new_root_disk(args.output, progress=progress) if args.output else template)
        return 0
    if action == "info":
        try:
            image = cached_image()
        except Exception as exc:
            from . import ImageError

            if not isinstance(exc, ImageError):
                raise
            print(f"pyvmm: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(image.manifest, indent=2, sort_keys=True))
        else:
            _print_info(image)
        return 0
    parser = getattr(args, "image_parser", None)
    if parser is not None:
        parser.print_help(sys.stderr)
    return 2


def _print_info(image) -> None:
    manifest = image.manifest
    print(f"image      {image.name} ({image.directory})")
    print(f"built      {manifest.get('built_at', '?')} in {manifest.get('build_seconds', '?')} s")
    print(f"kernel     {image.kernel}  Linux {image.kernel_version}, "
          f"{manifest['artifacts']['vmlinuz']['size'] / 1e6:.1f} MB")
    print(f"initramfs  {image.initramfs}  {manifest['artifacts']['initramfs.cpio.gz']['size'] / 1e6:.2f} MB")
    if image.system_map is not None:
        print(f"symbols    {image.system_map}")
    for name, version in sorted(image.packages.items()):
        print(f"package    {name} {version}")
    print(f"modules    {' '.join(image.modules) or '-'}")
    missing = manifest.get("missing_modules") or []
    if missing:
        print(f"missing    {' '.join(missing)}")
    print(f"cmdline    {image.cmdline} [pyvmm.cmd=<base64 of a shell command>]")
