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

    >>> image = default_image()                    # builds on first use
    >>> image.kernel, image.initramfs
    >>> image.command_line(["uname", "-a"])        # 'console=ttyS0 ... pyvmm.cmd=dW5hbWUgLWE='
"""

from __future__ import annotations

import base64
import datetime
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

from ..errors import UserError
from ..user_cache import user_cache

__all__ = [
    "CMD_PARAM",
    "DEFAULT_CMDLINE",
    "FORMAT_VERSION",
    "GuestImage",
    "ImageError",
    "build_default_image",
    "cache_root",
    "decode_command",
    "default_image",
    "encode_command",
    "image_dir",
    "init_script",
    "load_image",
    "print_to_stderr",
]

FORMAT_VERSION = 1
IMAGE_NAME = "default"
KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.cpio.gz"
SYSTEM_MAP_FILE = "System.map"
MANIFEST_FILE = "manifest.json"

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
KERNEL_PACKAGE_PATTERN = r"linux-image-[0-9][0-9.]*-[0-9]+-cloud-amd64(-unsigned)?"
BUSYBOX_PACKAGE = "busybox-static"

DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
CMD_PARAM = "pyvmm.cmd="
# x86 COMMAND_LINE_SIZE is 2048 bytes with the NUL; leave room for the default line and VMM extras
# (noxsave, clearcpuid=..., tsc_early_khz=...).
MAX_CMD_PARAM = 1536

Progress = Callable[[str], None]


class ImageError(UserError):
    """Building or finding a guest image failed; the message is one line for the user."""


def print_to_stderr(message: str) -> None:
    print(f"pyvmm: image: {message}", file=sys.stderr, flush=True)


# --- the command on the kernel command line -------------------------------------------------

def encode_command(argv: list[str]) -> str:
    """The kernel argument ``pyvmm.cmd=<base64>`` that makes the guest's init run `argv`.

    `argv` is joined with shlex.join (init runs it with ``sh -c``) and base64-encoded with the
    standard alphabet (A-Z a-z 0-9 + / =): no spaces or quotes, so the kernel's command line
    parser keeps it one argument, and the shell's word splitting in init leaves it whole.
    """
    if isinstance(argv, str):
        raise TypeError("encode_command takes a list of arguments, not a string")
    if not argv:
        raise ValueError("encode_command: empty argv")
    for arg in argv:
        if "\0" in arg:
            raise ValueError("encode_command: NUL bytes cannot be passed to the guest's shell")
    script = shlex.join(argv)
    try:
        encoded = script.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"encode_command: argument is not valid Unicode text ({exc.reason})") from None
    param = CMD_PARAM + base64.b64encode(encoded).decode("ascii")
    if len(param) > MAX_CMD_PARAM:
        raise ImageError(f"guest command too long for the kernel command line ({len(param)} > {MAX_CMD_PARAM} "
                         "characters after encoding)")
    return param


def decode_command(param: str) -> str:
    """The shell command carried by a ``pyvmm.cmd=...`` argument (or its bare base64 value)."""
    if param.startswith(CMD_PARAM):
        param = param[len(CMD_PARAM):]
    return base64.b64decode(param.encode("ascii"), validate=True).decode("utf-8")


# --- the cache ----------------------------------------------------------------------------------

def cache_root() -> pathlib.Path:
    return user_cache("images")


def image_dir(name: str = IMAGE_NAME) -> pathlib.Path:
    return cache_root() / name


def init_script() -> bytes:
    """The guest's /init (package data init.sh)."""
    return resources.files(__package__).joinpath("init.sh").read_bytes()


def _recipe_hash() -> str:
    """Everything that shapes the image besides the packages: a change means the cache is stale."""
    from .initramfs import OUTB_HELPER_CODE, vsock_helper_source
    from .modules import DEFAULT_MODULES

    digest = hashlib.sha256()
    for part in (str(FORMAT_VERSION).encode(), init_script(), OUTB_HELPER_CODE, vsock_helper_source(),
                 "\n".join(DEFAULT_MODULES).encode(),
                 KERNEL_METAPACKAGE.encode(), BUSYBOX_PACKAGE.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _sha256_file(path: pathlib.Path) -> str:
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
            parts.append(encode_command(argv))
        return " ".join(parts)


def _read_manifest(directory: pathlib.Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _check(directory: pathlib.Path, verify_hashes: bool = True) -> tuple[dict | None, str]:
    """(manifest, '') when `directory` holds a complete, current image; else (manifest or None, why not)."""
    manifest = _read_manifest(directory)
    if manifest is None:
        return None, "no manifest"
    if manifest.get("format") != FORMAT_VERSION:
        return manifest, f"format {manifest.get('format')} != {FORMAT_VERSION}"
    if manifest.get("recipe") != _recipe_hash():
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
        if verify_hashes and _sha256_file(path) != meta.get("sha256"):
            return manifest, f"{file_name} does not match its sha256"
    return manifest, ""


def _symbols_state(directory: pathlib.Path, manifest: dict, verify_hashes: bool = True) -> str:
    """'ok' when the manifest's System.map is there and intact, 'unavailable' when the kernel
    was found to have no readable symbols, 'missing' otherwise (to be added)."""
    symbols = manifest.get("symbols")
    if not isinstance(symbols, dict):
        return "missing"
    if symbols.get("kernel_sha256") != manifest["artifacts"][KERNEL_FILE].get("sha256"):
        return "missing"
    if "unavailable" in symbols:
        return "unavailable"
    path = directory / SYSTEM_MAP_FILE
    try:
        if path.stat().st_size != symbols.get("size"):
            return "missing"
    except OSError:
        return "missing"
    if verify_hashes and _sha256_file(path) != symbols.get("sha256"):
        return "missing"
    return "ok"


def _image_from(directory: pathlib.Path, manifest: dict, verify_hashes: bool = True) -> GuestImage:
    return GuestImage(
        name=manifest.get("name", directory.name),
        directory=directory,
        kernel=directory / KERNEL_FILE,
        initramfs=directory / INITRAMFS_FILE,
        system_map=directory / SYSTEM_MAP_FILE if _symbols_state(directory, manifest, verify_hashes) == "ok" else None,
        kernel_version=manifest["kernel_version"],
        packages=dict(manifest["packages"]),
        cmdline=manifest.get("cmdline", DEFAULT_CMDLINE),
        modules=tuple(manifest.get("modules", ())),
        manifest=manifest,
    )


def load_image(name: str = IMAGE_NAME, verify_hashes: bool = True) -> GuestImage:
    """The cached image `name`, or ImageError saying why it cannot be used."""
    directory = image_dir(name)
    manifest, problem = _check(directory, verify_hashes)
    if problem:
        raise ImageError(f"guest image {name!r} at {directory} is not usable ({problem}): run `pyvmm image build`")
    return _image_from(directory, manifest, verify_hashes)


def default_image(build_if_missing: bool = True, progress: Progress | None = print_to_stderr) -> GuestImage:
    """The default Linux guest image, built first if it is missing, incomplete or stale (and
    given its System.map if it has none yet)."""
    try:
        image = load_image(IMAGE_NAME)
        if image.system_map is not None or _symbols_state(image.directory, image.manifest, False) == "unavailable":
            return image
    except ImageError:
        if not build_if_missing:
            raise
    return build_default_image(rebuild=False, progress=progress)


# --- building -----------------------------------------------------------------------------------

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
                manifest, problem = _check(directory)
                if not problem:
                    if _symbols_state(directory, manifest) == "missing":
                        manifest = _add_symbols(directory, manifest, progress)
                    return _image_from(directory, manifest)
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
    return _image_from(directory, manifest)


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


def _kernel_symbols(vmlinuz: pathlib.Path) -> str:
    """The kernel's symbols as System.map text, read from its kallsyms tables (Debian's
    System.map is a one-line pointer to the 280 MB -dbg package). Raises ImageError."""
    from ..loader import LoaderError
    from ..loader.linux import extract_vmlinux
    from ..loader.linux.kallsyms import KallsymsNotFound, format_system_map, read_kallsyms

    try:
        # extract_vmlinux keeps the vmlinux in its cache: the first boot then reuses it
        return format_system_map(read_kallsyms(extract_vmlinux(vmlinuz).read_bytes()))
    except (KallsymsNotFound, LoaderError) as exc:
        raise ImageError(str(exc)) from None


def _symbols_record(directory: pathlib.Path, kernel_sha256: str, progress: Progress) -> dict:
    """Write directory/System.map for the kernel there; the manifest's "symbols" entry."""
    try:
        text = _kernel_symbols(directory / KERNEL_FILE)
    except ImageError as exc:
        progress(f"warning: no kernel symbols ({exc}); errors will not name kernel functions")
        return {"kernel_sha256": kernel_sha256, "unavailable": str(exc)}
    path = directory / SYSTEM_MAP_FILE
    tmp = path.with_name(f".{SYSTEM_MAP_FILE}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    progress(f"kernel symbols: {text.count(chr(10))} in {path}")
    return {"kernel_sha256": kernel_sha256, "file": SYSTEM_MAP_FILE, "size": path.stat().st_size,
            "sha256": _sha256_file(path)}


def _add_symbols(directory: pathlib.Path, manifest: dict, progress: Progress) -> dict:
    """Give an existing image its System.map (images of older pyvmm versions have none); a
    cache that cannot be written leaves the image as it was."""
    try:
        updated = dict(manifest, symbols=_symbols_record(directory, manifest["artifacts"][KERNEL_FILE]["sha256"],
                                                          progress))
        path = directory / MANIFEST_FILE
        tmp = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(updated, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        progress(f"warning: cannot add the kernel's System.map to {directory}: {exc.strerror or exc}")
        return manifest
    return updated


def _build(work: pathlib.Path, progress: Progress) -> dict:
    from . import debian
    from .initramfs import Initramfs, outb_helper_elf, vsock_helper_elf
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
    artifacts = {}
    for file_name in (KERNEL_FILE, INITRAMFS_FILE):
        path = out / file_name
        artifacts[file_name] = {"sha256": _sha256_file(path), "size": path.stat().st_size}
    manifest = {
        "format": FORMAT_VERSION,
        "name": IMAGE_NAME,
        "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_seconds": round(time.monotonic() - started, 1),
        "recipe": _recipe_hash(),
        "kernel_version": kernel_version,
        "packages": {meta.name: meta.version, kernel_pkg.name: kernel_pkg.version,
                     busybox_pkg.name: busybox_pkg.version},
        "package_sha256": {kernel_pkg.name: kernel_pkg.sha256, busybox_pkg.name: busybox_pkg.sha256},
        "modules": [m.name for m in modules],
        "missing_modules": missing,
        "cmdline": DEFAULT_CMDLINE,
        "artifacts": artifacts,
    }
    manifest["symbols"] = _symbols_record(out, artifacts[KERNEL_FILE]["sha256"], progress)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    progress(f"built {IMAGE_NAME}: Linux {kernel_version}, initramfs {len(initramfs) / 1e6:.1f} MB, "
             f"{manifest['build_seconds']} s")
    return manifest
