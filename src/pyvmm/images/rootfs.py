"""`pyvmm image rootfs`: a small Debian root filesystem image (ext4) for VMs that boot from
a disk (`pyvmm run --disk PATH,root`, Firecracker's is_root_device).

Its contents are the default image's userland - busybox-static, the kernel's modules, the
guest agent, the port helpers - plus Debian's base-files (os-release, /etc skeleton), with
pyvmm's init script as /sbin/init. The default kernel boots it through pyvmm's initramfs,
which loads virtio_blk and ext4, mounts the disk and switch_root's to that init; a kernel
with the drivers built in mounts it itself. Either way the same init brings up the console,
the guest agent and the power button, and runs `pyvmm.cmd=` or a shell.

Built with `mkfs.ext4 -d` (e2fsprogs) from a directory, no loop device or root needed, and
cached beside the default image (rebuilt when that image or this recipe changes):

    $XDG_CACHE_HOME/pyvmm/images/rootfs/rootfs.ext4, manifest.json

`new_root_disk(path)` copies it sparsely: each VM writes its own copy.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile

from .build import _Lock, default_image
from .cache import cache_root
from .image import ImageError, Progress, print_to_stderr, sha256_file
from .recipe import init_script

ROOTFS_NAME = "rootfs"
ROOTFS_FILE = "rootfs.ext4"
ROOTFS_RECIPE = 1          # bump when what goes into the image changes
DEFAULT_SIZE_MIB = 256
BASE_FILES_PACKAGE = "base-files"


def rootfs_image(rebuild: bool = False, progress: Progress | None = print_to_stderr,
                 size_mib: int = DEFAULT_SIZE_MIB) -> pathlib.Path:
    """The cached root filesystem image (a template: copy it before booting, see new_root_disk)."""
    progress = progress or (lambda message: None)
    image = default_image(progress=progress)
    directory = cache_root() / ROOTFS_NAME
    wanted = {"recipe": ROOTFS_RECIPE, "size_mib": size_mib, "init": _digest(init_script()),
              "initramfs_sha256": image.manifest["artifacts"]["initramfs.cpio.gz"]["sha256"]}
    with _Lock(cache_root() / f".{ROOTFS_NAME}.lock"):
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = None
        if not rebuild and isinstance(manifest, dict) and manifest.get("inputs") == wanted \
                and (directory / ROOTFS_FILE).is_file():
            return directory / ROOTFS_FILE
        directory.mkdir(parents=True, exist_ok=True)
        work = pathlib.Path(tempfile.mkdtemp(prefix=f".{ROOTFS_NAME}.build-", dir=cache_root()))
        try:
            output = work / ROOTFS_FILE
            packages = _populate(work / "tree", image, work, progress)
            progress(f"making the ext4 file system ({size_mib} MiB)")
            _mkfs(work / "tree", output, size_mib)
            os.replace(output, directory / ROOTFS_FILE)
            manifest = {"inputs": wanted, "packages": packages, "kernel_version": image.kernel_version,
                        "sha256": sha256_file(directory / ROOTFS_FILE)}
            (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise ImageError(f"building the root filesystem image: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    progress(f"built {directory / ROOTFS_FILE}")
    return directory / ROOTFS_FILE


def new_root_disk(destination: str | os.PathLike, *, progress: Progress | None = print_to_stderr) -> pathlib.Path:
    """A fresh, writable copy of the root filesystem image at `destination` (sparse)."""
    template = rootfs_image(progress=progress)
    destination = pathlib.Path(destination)
    if destination.exists():
        raise ImageError(f"{destination}: exists already (a root disk is never overwritten)")
    result = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(template), str(destination)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"copying the root filesystem to {destination}: {result.stderr.strip()}")
    return destination


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _populate(tree: pathlib.Path, image, work: pathlib.Path, progress: Progress) -> dict[str, str]:
    """The default initramfs's files, base-files, and the init script as /sbin/init."""
    from . import debian

    tree.mkdir()
    _unpack_newc(gzip.decompress(image.initramfs.read_bytes()), tree)
    (tree / "init").unlink()
    sbin_init = tree / "sbin" / "init"
    if sbin_init.is_symlink() or sbin_init.exists():
        sbin_init.unlink()
    sbin_init.write_bytes(init_script())
    sbin_init.chmod(0o755)
    base, _ = debian.package_info(BASE_FILES_PACKAGE, progress)
    debs = work / "debs"
    debs.mkdir()
    base_tree = debian.extract(debian.download(base, debs, progress), work / "base-files", progress)
    _merge(base_tree, tree)
    (tree / "etc" / "fstab").write_text("/dev/root / auto defaults 0 1\n")
    (tree / "etc" / "hostname").write_text("pyvmm\n")
    return {**image.packages, base.name: base.version}


def _merge(source: pathlib.Path, tree: pathlib.Path) -> None:
    """Copy `source` into `tree`, keeping what `tree` has (busybox's links win over base-files')."""
    for path in sorted(source.rglob("*")):
        target = tree / path.relative_to(source)
        if path.is_symlink():
            if not target.exists() and not target.is_symlink():
                target.symlink_to(os.readlink(path))
        elif path.is_dir():
            target.mkdir(exist_ok=True)
        elif not target.exists():
            shutil.copy2(path, target)


def _unpack_newc(archive: bytes, tree: pathlib.Path) -> None:
    """Write the entries of a newc cpio archive under `tree` (device nodes skipped: devtmpfs
    provides them)."""
    at = 0
    while True:
        if archive[at:at + 6] != b"070701":
            raise ImageError("the default image's initramfs is not a newc archive")
        fields = [int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = at + 110
        name = archive[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start:data_start + filesize]
        at = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return
        target = tree / name
        if stat.S_ISDIR(mode):
            target.mkdir(exist_ok=True)
            target.chmod(stat.S_IMODE(mode))
        elif stat.S_ISLNK(mode):
            target.symlink_to(data.decode())
        elif stat.S_ISREG(mode):
            target.write_bytes(data)
            target.chmod(stat.S_IMODE(mode))


def _mkfs(tree: pathlib.Path, output: pathlib.Path, size_mib: int) -> None:
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
    if mkfs is None:
        raise ImageError("mkfs.ext4 not found: it builds the root filesystem image (apt-get install e2fsprogs)")
    with open(output, "wb") as file:
        file.truncate(size_mib << 20)
    result = subprocess.run([mkfs, "-q", "-F", "-L", "pyvmm-root", "-d", str(tree), str(output)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"mkfs.ext4 failed: {(result.stderr.strip().splitlines() or ['no output'])[0]}")
