"""benchmarks/guest_tools.py: the ELF reader and the library resolver of the benchmark tools disk,
on programs and libraries compiled here (gcc, which scripts/setup installs), with packages as
local directories (no download)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

sys.path.append(str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other by name
from guest_tools import INTERP, Resolver, read_elf_dynamic  # noqa: E402

from pyvmm.images import ImageError  # noqa: E402


def gcc(*args: str) -> None:
    done = subprocess.run(["gcc", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"gcc {' '.join(args)}: {done.stderr}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """libdemo.so.3 (soname, RUNPATH $ORIGIN/private, needs libinner.so.1 found there), a program
    linking it, and a program that needs nothing but libc."""
    work = tmp_path_factory.mktemp("elf")
    (work / "inner.c").write_text("int inner(void) { return 41; }\n")
    (work / "demo.c").write_text("int inner(void);\nint demo(void) { return inner() + 1; }\n")
    (work / "main.c").write_text("int demo(void);\nint main(void) { return demo() == 42 ? 0 : 1; }\n")
    (work / "plain.c").write_text("#include <stdio.h>\nint main(void) { puts(\"plain\"); return 0; }\n")
    gcc("-shared", "-fPIC", "-Wl,-soname,libinner.so.1", "-o", str(work / "libinner.so.1"), str(work / "inner.c"))
    gcc("-shared", "-fPIC", "-Wl,-soname,libdemo.so.3", "-Wl,--enable-new-dtags", "-Wl,-rpath,$ORIGIN/private",
        "-o", str(work / "libdemo.so.3.0.0"), str(work / "demo.c"), str(work / "libinner.so.1"))
    gcc("-o", str(work / "main"), str(work / "main.c"), str(work / "libdemo.so.3.0.0"), f"-Wl,-rpath-link,{work}")
    gcc("-o", str(work / "plain"), str(work / "plain.c"))
    return work


def test_read_elf_dynamic_gives_what_the_dynamic_loader_reads(built):
    main = read_elf_dynamic((built / "main").read_bytes())
    assert main.interp == f"/lib64/{INTERP}"
    assert main.needed == ("libdemo.so.3", "libc.so.6")
    assert main.soname is None and main.runpath == ()

    demo = read_elf_dynamic((built / "libdemo.so.3.0.0").read_bytes())
    assert demo.soname == "libdemo.so.3"
    assert demo.needed == ("libinner.so.1",)
    assert demo.runpath == ("$ORIGIN/private",)
    assert demo.interp is None

    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        read_elf_dynamic(b"#!/bin/sh\n")


def host_libc() -> pathlib.Path:
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"):
        if os.path.exists(f"{d}/libc.so.6"):
            return pathlib.Path(d)
    pytest.fail("no x86-64 glibc on this host (Debian 12 keeps it in /lib/x86_64-linux-gnu)")


class LocalResolver(Resolver):
    """Packages are directories made by the test; `fetch` records which ones were asked for."""

    def __init__(self, work: pathlib.Path, packages: dict[str, tuple[pathlib.Path, list[str]]]) -> None:
        super().__init__(work, lambda message: None)
        self.packages, self.fetched = packages, []

    def fetch(self, name: str):
        if name not in self.trees:
            self.fetched.append(name)
            tree, depends = self.packages.get(name, (None, []))
            self.trees[name], self.versions[name], self.depends_of[name] = tree, "1.0", depends
        return self.trees[name]


def package_trees(built: pathlib.Path, root: pathlib.Path) -> dict[str, tuple[pathlib.Path, list[str]]]:
    libc = host_libc()
    trees = {}
    for name in ("fio", "iperf3", "libdemo3", "libc6", "unrelated"):
        (root / name).mkdir(parents=True)
        trees[name] = root / name
    for name, program in (("fio", "main"), ("iperf3", "plain")):
        (trees[name] / "usr/bin").mkdir(parents=True)
        shutil.copy(built / program, trees[name] / "usr/bin" / name)
    lib = trees["libdemo3"] / "usr/lib/x86_64-linux-gnu"
    (lib / "private").mkdir(parents=True)
    shutil.copy(built / "libdemo.so.3.0.0", lib)
    os.symlink("libdemo.so.3.0.0", lib / "libdemo.so.3")           # as Debian ships it: soname -> file
    shutil.copy(built / "libinner.so.1", lib / "private")          # only reachable through RUNPATH
    c = trees["libc6"] / "lib/x86_64-linux-gnu"
    c.mkdir(parents=True)
    for soname in ("libc.so.6", INTERP):
        shutil.copy(libc / soname, c)
    return {"fio": (trees["fio"], ["unrelated-virtual", "libdemo3", "libc6"]),
            "iperf3": (trees["iperf3"], ["libc6"]),
            "libdemo3": (trees["libdemo3"], ["libc6"]),
            "libc6": (trees["libc6"], []),
            "unrelated": (trees["unrelated"], [])}


def test_the_resolver_ships_each_program_with_every_library_and_the_loader(built, tmp_path):
    packages = package_trees(built, tmp_path / "pkgs")
    resolver = LocalResolver(tmp_path / "work", packages)
    files = resolver.resolve()
    assert {dest: package for dest, (package, _) in files.items()} == {
        "bin/fio": "fio", "bin/iperf3": "iperf3",
        "lib/libdemo.so.3": "libdemo3",       # found in fio's Depends, through the soname symlink
        "lib/libinner.so.1": "libdemo3",      # libdemo's RUNPATH ($ORIGIN/private)
        "lib/libc.so.6": "libc6", f"lib/{INTERP}": "libc6",
    }
    assert files["lib/libdemo.so.3"][1].name == "libdemo.so.3.0.0"   # the file itself, not the link
    assert "unrelated" not in resolver.fetched                           # only Depends are downloaded

    # What was resolved runs: the program, its libraries and the loader laid out as in the image.
    image = tmp_path / "image"
    for dest, (_, source) in files.items():
        (image / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, image / dest)
    run = subprocess.run([str(image / "lib" / INTERP), "--library-path", str(image / "lib"), str(image / "bin/fio")])
    assert run.returncode == 0


def test_a_library_in_no_package_stops_the_build_with_its_name(built, tmp_path):
    packages = package_trees(built, tmp_path / "pkgs")
    (packages["libdemo3"][0] / "usr/lib/x86_64-linux-gnu/private/libinner.so.1").unlink()
    with pytest.raises(ImageError, match=r"libdemo\.so\.3\.0\.0 \(package libdemo3\) needs libinner\.so\.1"):
        LocalResolver(tmp_path / "work", packages).resolve()


def test_a_package_without_its_program_is_an_error(built, tmp_path):
    packages = package_trees(built, tmp_path / "pkgs")
    (packages["iperf3"][0] / "usr/bin/iperf3").unlink()
    with pytest.raises(ImageError, match="package iperf3 has no usr/bin/iperf3"):
        LocalResolver(tmp_path / "work", packages).resolve()

