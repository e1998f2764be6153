"""Debian packages as build inputs: resolve, download (no system install), extract.

Uses the host's apt (``apt-cache``, ``apt-get download``) and ``dpkg-deb -x``.
``apt-get download`` needs no root; ``apt-get update`` (run once, only when
apt knows nothing about a package) does.
"""

from __future__ import annotations

import errno
import os
import pathlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

from .image import ImageError

__all__ = ["DebPackage", "download", "extract", "package_info", "resolve_metapackage"]

Progress = Callable[[str], None]

_TIMEOUT = 900  # seconds for one apt-get call (a slow mirror, a big package)


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    size: int = 0          # bytes of the .deb, from the package index
    sha256: str = ""       # of the .deb, from the package index


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"{tool} not found: building the guest image needs a Debian/Ubuntu host (apt, dpkg)")
    return path


def _apt_error(result: subprocess.CompletedProcess, what: str) -> ImageError:
    text = (result.stderr or "") + (result.stdout or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    detail = (errors or lines or [f"exit status {result.returncode}"])[-1]
    if "No space left on device" in text:
        detail = "no space left on device"
    elif re.search(r"Temporary failure resolving|Could not resolve|Failed to fetch|Connection failed|"
                   r"Network is unreachable|Could not connect", text):
        detail = f"network error ({detail})"
    return ImageError(f"{what}: {detail}")


def _run(argv: list[str], what: str, cwd: pathlib.Path | None = None) -> str:
    _require(argv[0])
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: {argv[0]} did not finish in {_TIMEOUT} s") from None
    except OSError as exc:
        raise ImageError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        raise _apt_error(result, what)
    return result.stdout


def _show(name: str) -> str:
    """`apt-cache show` of the candidate version, or '' when apt knows no such package."""
    _require("apt-cache")
    result = subprocess.run(["apt-cache", "show", "--no-all-versions", name], capture_output=True, text=True,
                            env=dict(os.environ, LC_ALL="C"))
    if result.returncode != 0 or not result.stdout.strip():
        return ""
    return result.stdout


_updated = False


def _apt_update(progress: Progress) -> None:
    global _updated
    if _updated:
        return
    _updated = True
    if os.geteuid() != 0:
        raise ImageError("apt knows no packages yet: run `apt-get update` as root, then build again")
    progress("apt-get update (the package lists are empty or lack a package)")
    _run(["apt-get", "update", "-q"], "apt-get update")


def package_info(name: str, progress: Progress) -> tuple[DebPackage, str]:
    """The candidate version of `name` and its raw `apt-cache show` record (updating apt once if needed)."""
    record = _show(name)
    if not record:
        _apt_update(progress)
        record = _show(name)
    if not record:
        raise ImageError(f"package {name} not found by apt-cache (is this Debian 12 with main enabled?)")
    fields = _fields(record)
    if "Version" not in fields:
        raise ImageError(f"apt-cache show {name}: no Version field")
    size = int(fields.get("Size", "0") or 0)
    return DebPackage(name, fields["Version"], size, fields.get("SHA256", "")), record


def _fields(record: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in record.split("\n\n")[0].splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def resolve_metapackage(meta: str, pattern: str, progress: Progress) -> tuple[DebPackage, DebPackage]:
    """(metapackage, the real package it depends on whose name matches `pattern`).

    linux-image-cloud-amd64 (6.1.192-2) depends on linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2).
    """
    meta_pkg, record = package_info(meta, progress)
    depends = _fields(record).get("Depends", "")
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0]
        if re.fullmatch(pattern, name):
            real, _ = package_info(name, progress)
            return meta_pkg, real
    raise ImageError(f"{meta} {meta_pkg.version} depends on no package matching {pattern} (Depends: {depends})")


def download(package: DebPackage, dest: pathlib.Path, progress: Progress) -> pathlib.Path:
    """`apt-get download NAME=VERSION` into `dest`; returns the .deb path."""
    size = f" ({package.size / 1e6:.1f} MB)" if package.size else ""
    progress(f"downloading {package.name} {package.version}{size}")
    before = set(dest.glob("*.deb"))
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else
          "APT::Sandbox::User=_apt", f"{package.name}={package.version}"],
         f"downloading {package.name}", cwd=dest)
    new = sorted(set(dest.glob("*.deb")) - before)
    matches = [p for p in new if p.name.startswith(package.name + "_")] or new
    if not matches:
        raise ImageError(f"apt-get download {package.name}: no .deb appeared in {dest}")
    return matches[0]


def extract(deb: pathlib.Path, dest: pathlib.Path, progress: Progress) -> pathlib.Path:
    """`dpkg-deb -x DEB DEST`."""
    progress(f"extracting {deb.name}")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"extracting {deb.name}")
    except OSError as exc:  # pragma: no cover - mkdir failures
        if exc.errno == errno.ENOSPC:
            raise ImageError(f"extracting {deb.name}: no space left on device") from None
        raise
    return dest
