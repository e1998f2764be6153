"""The image's System.map: read from the kernel's own kallsyms tables at build time (Debian's
package has a stub), recorded in the manifest apart from the artifacts, and added to images
built by pyvmm versions that wrote none."""

from __future__ import annotations

import json
import os
import pathlib

from .image import KERNEL_FILE, MANIFEST_FILE, SYSTEM_MAP_FILE, ImageError, Progress, sha256_file


def symbols_state(directory: pathlib.Path, manifest: dict, verify_hashes: bool = True) -> str:
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
    if verify_hashes and sha256_file(path) != symbols.get("sha256"):
        return "missing"
    return "ok"


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


def symbols_record(directory: pathlib.Path, kernel_sha256: str, progress: Progress) -> dict:
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
            "sha256": sha256_file(path)}


def add_symbols(directory: pathlib.Path, manifest: dict, progress: Progress) -> dict:
    """Give an existing image its System.map (images of older pyvmm versions have none); a
    cache that cannot be written leaves the image as it was."""
    try:
        updated = dict(manifest, symbols=symbols_record(directory, manifest["artifacts"][KERNEL_FILE]["sha256"],
                                                          progress))
        path = directory / MANIFEST_FILE
        tmp = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(updated, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        progress(f"warning: cannot add the kernel's System.map to {directory}: {exc.strerror or exc}")
        return manifest
    return updated
