"""Building the default image from Debian packages into the cache, and `default_image()`,
which builds it on first use."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from typing import Any

from .cache import GuestImage, cache_root, cached_image, check, image_from
from .image import (DEFAULT_CMDLINE, FORMAT_VERSION, IMAGE_NAME, INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE,
                    ImageError, Progress, print_to_stderr, sha256_file)
from .recipe import BUSYBOX_PACKAGE, KERNEL_METAPACKAGE, KERNEL_PACKAGE_PATTERN, init_script, recipe_hash
from .symbols import add_symbols, symbols_record, symbols_state


def default_image(build_if_missing: bool = True, progress: Progress | None = print_to_stderr) -> GuestImage:
    """The default Linux guest image, built first if it is missing, incomplete or stale (and
    given its System.map if it has none yet)."""
    try:
        image = cached_image(IMAGE_NAME)
        if image.system_map is not None or symbols_state(image.directory, image.manifest, False) == "unavailable":
            return image
    except ImageError:
        if not build_if_missing:
            raise
    return build_default_image(rebuild=False, progress=progress)


class _Lock:
    """An exclusive flock on images/.NAME.lock, so concurrent builders take turns."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.fd = -1

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def build_default_image(rebuild: bool = False, progress: Progress | None = print_to_stderr,
                        cache: pathlib.Path | None = None) -> GuestImage:
    """Build (or, unless `rebuild`, reuse) the default image in the per-user cache."""
    progress = progress or (lambda message: None)
    root = cache if cache is not None else cache_root()
    directory = root / IMAGE_NAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _Lock(root / f".{IMAGE_NAME}.lock"):
            if not rebuild:
                manifest, problem = check(directory)
                if not problem and manifest is not None:
                    if symbols_state(directory, manifest) == "missing":
                        manifest = add_symbols(directory, manifest, progress)
                    return image_from(directory, manifest)
                if manifest is not None:
                    progress(f"rebuilding: {problem}")
            work = pathlib.Path(tempfile.mkdtemp(prefix=f".{IMAGE_NAME}.build-", dir=root))
            try:
                manifest = _build(work, progress)
                _install(work / "out", directory)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ImageError(f"building the guest image in {root}: no space left on device") from None
        raise ImageError(f"building the guest image in {root}: {exc.strerror or exc}"
                         f"{': ' + str(exc.filename) if exc.filename else ''}") from None
    return image_from(directory, manifest)


def _install(out: pathlib.Path, directory: pathlib.Path) -> None:
    """Move the finished `out` directory to `directory` (two renames; readers never see a half image)."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.rename(directory, old)
    os.rename(out, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _busybox_applets(busybox: pathlib.Path) -> list[str]:
    """Paths of busybox's applet links ('bin/sh', 'usr/bin/base64', ...), from the binary itself."""
    try:
        result = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and result.stdout.strip():
            return [line.strip().strip("/") for line in result.stdout.splitlines() if line.strip()]
    except OSError:
        pass
    # A host that cannot run the x86-64 binary: the applets init and a user need most.
    return [f"bin/{name}" for name in (
        "sh", "ash", "cat", "cp", "dd", "dmesg", "echo", "grep", "hostname", "ls", "mkdir", "mknod", "mount",
        "mv", "printf", "ps", "rm", "sed", "sleep", "sync", "umount", "uname", "base64", "setsid", "cttyhack",
        "head", "tail", "wc", "sort", "tr", "cut", "env", "id", "kill", "ln", "true", "false", "test", "vi",
    )] + [f"sbin/{name}" for name in ("insmod", "modprobe", "rmmod", "lsmod", "poweroff", "reboot", "halt", "ip",
                                      "ifconfig", "depmod", "modinfo")]


def _build(work: pathlib.Path, progress: Progress) -> dict:
    from . import debian
    from .initramfs import Initramfs, agent_elf, outb_helper_elf, vsock_helper_elf
    from .modules import DEFAULT_MODULES, ModuleError, ModuleIndex, format_load_list, format_modules_dep

    started = time.monotonic()
    meta, kernel_pkg = debian.resolve_metapackage(KERNEL_METAPACKAGE, KERNEL_PACKAGE_PATTERN, progress)
    busybox_pkg, _ = debian.package_info(BUSYBOX_PACKAGE, progress)
    debs = work / "debs"
    debs.mkdir()
    kernel_deb = debian.download(kernel_pkg, debs, progress)
    busybox_deb = debian.download(busybox_pkg, debs, progress)
    kernel_tree = debian.extract(kernel_deb, work / "kernel", progress)
    busybox_tree = debian.extract(busybox_deb, work / "busybox", progress)

    module_roots = sorted(p for p in (kernel_tree / "lib" / "modules").glob("*") if p.is_dir())
    if len(module_roots) != 1:
        raise ImageError(f"{kernel_deb.name}: expected one lib/modules/VERSION directory, found {len(module_roots)}")
    kernel_version = module_roots[0].name
    vmlinuz = kernel_tree / "boot" / f"vmlinuz-{kernel_version}"
    if not vmlinuz.is_file():
        raise ImageError(f"{kernel_deb.name}: no boot/vmlinuz-{kernel_version}")
    busybox = busybox_tree / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageError(f"{busybox_deb.name}: no bin/busybox")

    index = ModuleIndex(module_roots[0])
    try:
        modules, missing = index.resolve(DEFAULT_MODULES)
    except ModuleError as exc:
        raise ImageError(f"kernel modules: {exc}") from None
    for name in missing:
        progress(f"warning: module {name} not in {kernel_pkg.name}; the guest will report it missing")
    progress(f"building initramfs: {len(modules)} modules")

    fs = Initramfs()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "lib", "mnt", "proc", "run", "sys", "var", "dev"):
        fs.mkdir(d)
    fs.mkdir("tmp", 0o1777)
    fs.mkdir("root", 0o700)
    fs.chardev("dev/console", 5, 1, 0o600)  # the kernel opens it for init before devtmpfs is mounted
    fs.chardev("dev/null", 1, 3, 0o666)
    fs.file("init", init_script(), 0o755)
    fs.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet and applet not in fs and applet != "init":
            fs.symlink(applet, "/bin/busybox")
    fs.file("bin/pyvmm-outb", outb_helper_elf(), 0o755)
    try:
        fs.file("bin/pyvmm-vsock", vsock_helper_elf(work), 0o755)
        fs.file("bin/pyvmm-agent", agent_elf(work), 0o755)
    except OSError as exc:
        raise ImageError(str(exc)) from None
    fs.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    fs.file("etc/group", b"root:x:0:\ntty:x:5:\n")
    fs.file("etc/hostname", b"pyvmm\n")
    moddir = f"lib/modules/{kernel_version}"
    fs.mkdir(moddir)
    for module in modules:
        try:
            fs.file(f"{moddir}/{module.plain_relpath}", index.elf(module.relpath))
        except ModuleError as exc:
            raise ImageError(f"kernel modules: {exc}") from None
    fs.file(f"{moddir}/modules.dep", format_modules_dep(modules).encode())
    for extra in ("modules.builtin", "modules.order"):
        if (module_roots[0] / extra).is_file():
            fs.file(f"{moddir}/{extra}", (module_roots[0] / extra).read_bytes())
    fs.file(f"{moddir}/pyvmm.load", format_load_list(modules, missing).encode())
    initramfs = fs.cpio_gz()

    out = work / "out"
    out.mkdir()
    shutil.copyfile(vmlinuz, out / KERNEL_FILE)
    (out / INITRAMFS_FILE).write_bytes(initramfs)
    artifacts: dict[str, dict[str, Any]] = {}
    for file_name in (KERNEL_FILE, INITRAMFS_FILE):
        path = out / file_name
        artifacts[file_name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {
        "format": FORMAT_VERSION,
        "name": IMAGE_NAME,
        "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_seconds": round(time.monotonic() - started, 1),
        "recipe": recipe_hash(),
        "kernel_version": kernel_version,
        "packages": {meta.name: meta.version, kernel_pkg.name: kernel_pkg.version,
                     busybox_pkg.name: busybox_pkg.version},
        "package_sha256": {kernel_pkg.name: kernel_pkg.sha256, busybox_pkg.name: busybox_pkg.sha256},
        "modules": [m.name for m in modules],
        "missing_modules": missing,
        "cmdline": DEFAULT_CMDLINE,
        "artifacts": artifacts,
    }
    manifest["symbols"] = symbols_record(out, artifacts[KERNEL_FILE]["sha256"], progress)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    progress(f"built {IMAGE_NAME}: Linux {kernel_version}, initramfs {len(initramfs) / 1e6:.1f} MB, "
             f"{manifest['build_seconds']} s")
    return manifest
