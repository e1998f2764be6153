"""The benchmark guest's tools: Debian's fio and iperf3 with every shared library they load, on a
read-only ext4 disk image that pyvmm and QEMU attach the same way (tools_io.py).

Built on first use from Debian 12's packages, nothing installed on the host: `apt-get download`
of fio and iperf3, then of the packages they depend on, `dpkg-deb -x` into a work directory
(pyvmm.images.debian, as the default image is built). The shared libraries are resolved by
reading each ELF's DT_NEEDED, DT_RUNPATH and PT_INTERP (below, no binutils): a soname is looked
for in the package of the file that needs it (its RUNPATH first), then in that package's
Depends, downloaded when first needed, until every library is found; an unresolved one stops
the build with its name. Only the files needed go into the image:

    bin/fio, bin/iperf3       the programs, as Debian ships them
    lib/SONAME                each library (65 in Debian 12: fio links librados, librbd, libgfapi...
                              for its engines, which pull in ceph, gnutls, ICU...), and
    lib/ld-linux-x86-64.so.2  the dynamic loader (PT_INTERP)

About 40 MB of debs are downloaded and the image is ~120 MiB (most of it libraries fio never
calls: a disk, not an initramfs, so that the guest reads only the pages it uses and its 256 MiB
RAM is not spent on them). The guest mounts it read-only and runs the programs with
LD_LIBRARY_PATH=<mount>/lib and /lib64/ld-linux-x86-64.so.2 linked to <mount>/lib (GUEST_SETUP).

Cached per user, keyed by the candidate versions of fio and iperf3 and RECIPE:

    ~/.cache/pyvmm/images/bench-tools-<key>/tools.ext4, manifest.json (packages and versions, each
    file's package and size, the image's sha256)
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "src"))

from pyvmm.images import ImageError, cache_root, print_to_stderr  # noqa: E402
from pyvmm.images.image import sha256_file  # noqa: E402

PROGRAMS = {"fio": "usr/bin/fio", "iperf3": "usr/bin/iperf3"}   # package -> program in it
RECIPE = 1                  # bump when what goes into the image changes
TOOLS_FILE = "tools.ext4"
TOOLS_SERIAL = "tools"      # the disk's virtio-blk serial: the guest finds it by that
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
INTERP = "ld-linux-x86-64.so.2"

# Guest shell (it needs `f MESSAGE`, which fails the script): `s SERIAL` names the virtio disk with
# that serial; the tools disk is mounted at /mnt/t and its programs made runnable.
GUEST_SETUP = f"""\
s(){{ for d in /sys/block/vd*;do [ "$(cat $d/serial)" = $1 ]&&echo /dev/${{d##*/}};done;}}
T=/mnt/t;mkdir -p $T /lib64;mount -t ext4 -o ro $(s {TOOLS_SERIAL}) $T||f no tools disk
ln -s $T/lib/{INTERP} /lib64;export LD_LIBRARY_PATH=$T/lib PATH=$PATH:$T/bin
"""


@dataclass(frozen=True)
class ElfDynamic:
    """What the dynamic loader reads from an ELF file to find its libraries."""

    interp: str | None
    needed: tuple[str, ...]
    soname: str | None
    runpath: tuple[str, ...]


def read_elf_dynamic(data: bytes) -> ElfDynamic:
    """PT_INTERP and the DT_NEEDED / DT_SONAME / DT_RUNPATH (or DT_RPATH) of a 64-bit little-endian ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, interp, dynamic = [], None, None
    for i in range(phnum):
        p_type, _, offset, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((vaddr, offset, filesz))
        elif p_type == 3:
            interp = data[offset:offset + filesz].split(b"\0")[0].decode()
        elif p_type == 2:
            dynamic = (offset, filesz)
    if dynamic is None:
        return ElfDynamic(interp, (), None, ())
    entries = []
    for at in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == 0:
            break
        entries.append((tag, value))
    strtab = next((v for t, v in entries if t == 5), None)
    if strtab is None:
        raise ValueError("dynamic section without DT_STRTAB")
    base = next((off + strtab - va for va, off, size in loads if va <= strtab < va + size), None)
    if base is None:
        raise ValueError("DT_STRTAB outside every PT_LOAD segment")

    def string(offset: int) -> str:
        return data[base + offset:data.index(b"\0", base + offset)].decode()

    needed = tuple(string(v) for t, v in entries if t == 1)
    soname = next((string(v) for t, v in entries if t == 14), None)
    runpath = next((string(v) for t, v in entries if t == 29), None) or \
        next((string(v) for t, v in entries if t == 15), None)
    return ElfDynamic(interp, needed, soname, tuple(p for p in (runpath or "").split(":") if p))


def _inside(tree: pathlib.Path, path: pathlib.Path) -> pathlib.Path | None:
    """`path` (in `tree`) with its symlinks followed inside `tree` (absolute targets are taken as
    relative to the tree root, as in the installed system); None if it is not a file there."""
    for _ in range(40):
        if path.is_symlink():
            target = os.readlink(path)
            path = tree / target.lstrip("/") if target.startswith("/") else path.parent / target
            path = pathlib.Path(os.path.normpath(path))
            continue
        return path if path.is_file() else None
    return None


class Resolver:
    """Downloads packages as the libraries require them and collects the files to ship."""

    def __init__(self, work: pathlib.Path, progress) -> None:
        self.work, self.progress = work, progress
        (work / "debs").mkdir(parents=True, exist_ok=True)
        self.trees: dict[str, pathlib.Path] = {}
        self.versions: dict[str, str] = {}
        self.depends_of: dict[str, list[str]] = {}
        self.libraries: dict[str, tuple[str, pathlib.Path]] = {}   # soname -> (package, real file)

    def fetch(self, name: str) -> pathlib.Path | None:
        """The extracted tree of package `name`; None for a name apt has no package for (virtual)."""
        from pyvmm.images import debian

        if name not in self.trees:
            try:
                package, record = debian.package_info(name, self.progress)
            except ImageError:
                self.trees[name] = None
                return None
            deb = debian.download(package, self.work / "debs", self.progress)
            self.trees[name] = debian.extract(deb, self.work / "pkgs" / name, lambda message: None)
            self.versions[name] = package.version
            self.depends_of[name] = _depends(record)
        return self.trees[name]

    def _search(self, soname: str, package: str, elf: pathlib.Path, runpath: tuple[str, ...]) -> pathlib.Path | None:
        tree = self.trees[package]
        dirs = [tree / p.replace("$ORIGIN", "/" + str(elf.parent.relative_to(tree))).lstrip("/") for p in runpath]
        dirs += [tree / d for d in LIB_DIRS]
        for d in dirs:
            found = _inside(tree, pathlib.Path(os.path.normpath(d / soname)))
            if found is not None:
                return found
        return None

    def find(self, soname: str, package: str, elf: pathlib.Path, runpath: tuple[str, ...]):
        """(package, file) providing `soname` for `elf` of `package`: that package, then its Depends."""
        if (found := self._search(soname, package, elf, runpath)) is not None:
            return package, found
        for dep in self.depends_of.get(package, []):
            if self.fetch(dep) is not None and (found := self._search(soname, dep, self.trees[dep], ())) is not None:
                return dep, found
        return None

    def resolve(self) -> dict[str, tuple[str, pathlib.Path]]:
        """Image path -> (package, source file) for the programs, their libraries and the loader."""
        files: dict[str, tuple[str, pathlib.Path]] = {}
        queue: list[tuple[str, pathlib.Path]] = []
        for package, program in PROGRAMS.items():
            tree = self.fetch(package)
            path = None if tree is None else _inside(tree, tree / program)
            if path is None:
                raise ImageError(f"package {package} has no {program}")
            files[f"bin/{pathlib.Path(program).name}"] = (package, path)
            queue.append((package, path))
        while queue:
            package, elf = queue.pop(0)
            info = read_elf_dynamic(elf.read_bytes())
            wanted = list(info.needed)
            if info.interp:
                wanted.append(pathlib.Path(info.interp).name)
            for soname in wanted:
                if soname in self.libraries:
                    continue
                found = self.find(soname, package, elf, info.runpath)
                if found is None:
                    raise ImageError(f"{elf.name} (package {package}) needs {soname}, found in neither {package} "
                                     f"nor its Depends")
                self.libraries[soname] = found
                files[f"lib/{soname}"] = found
                queue.append(found)
        return files


def _depends(record: str) -> list[str]:
    """Pre-Depends and Depends of an `apt-cache show` record: the first alternative of each."""
    names = []
    for line in record.split("\n\n")[0].splitlines():
        if line.startswith(("Depends:", "Pre-Depends:")):
            for item in line.partition(":")[2].split(","):
                name = item.split("|")[0].strip().split(" ")[0].split(":")[0]
                if name and name not in names:
                    names.append(name)
    return names


def _candidate_versions(progress) -> dict[str, str]:
    from pyvmm.images import debian

    return {name: debian.package_info(name, progress)[0].version for name in PROGRAMS}


def _mkfs(tree: pathlib.Path, image: pathlib.Path) -> None:
    used = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())
    size_mib = used * 5 // 4 // (1 << 20) + 16
    if shutil.which("mkfs.ext4") is None:
        raise ImageError("mkfs.ext4 not found: it builds the benchmark tools disk (apt-get install e2fsprogs)")
    result = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "pyvmm-tools", "-O", "^has_journal",
                             "-E", "root_owner=0:0", "-d", str(tree), str(image), f"{size_mib}M"],
                            capture_output=True, text=True, env=dict(os.environ, E2FSPROGS_FAKE_TIME="1"))
    if result.returncode:
        raise ImageError(f"mkfs.ext4 -d {tree}: {(result.stderr.strip().splitlines() or ['failed'])[-1]}")


def tools_image(progress=print_to_stderr) -> pathlib.Path:
    """The cached tools disk image (read-only: attach it with readonly / readonly=on), built first if needed."""
    progress = progress or (lambda message: None)
    versions = _candidate_versions(progress)
    key = hashlib.sha256(json.dumps({"recipe": RECIPE, "versions": versions}, sort_keys=True).encode()).hexdigest()
    directory = cache_root() / f"bench-tools-{key[:16]}"
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".bench-tools.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)    # concurrent builders take turns
        if (directory / "manifest.json").is_file() and (directory / TOOLS_FILE).is_file():
            return directory / TOOLS_FILE
        work = pathlib.Path(tempfile.mkdtemp(prefix=".bench-tools.build-", dir=cache_root()))
        try:
            resolver = Resolver(work, progress)
            files = resolver.resolve()
            tree = work / "tree"
            for dest, (_, source) in files.items():
                (tree / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tree / dest)
                os.chmod(tree / dest, 0o755)
            out = work / "out"
            out.mkdir()
            _mkfs(tree, out / TOOLS_FILE)
            manifest = {
                "recipe": RECIPE, "key": key, "sha256": sha256_file(out / TOOLS_FILE),
                "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "packages": {name: resolver.versions[name] for name in sorted(resolver.versions)},
                "files": {dest: {"package": package, "size": source.stat().st_size}
                          for dest, (package, source) in sorted(files.items())},
            }
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if directory.exists():
                shutil.rmtree(directory)
            os.rename(out, directory)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    progress(f"built the benchmark tools disk: {len(files)} files, "
             f"{(directory / TOOLS_FILE).stat().st_size / (1 << 20):.0f} MiB")
    return directory / TOOLS_FILE


if __name__ == "__main__":
    print(tools_image())
