"""Take the vmlinux out of a bzImage once, and keep it in the user's cache.

The cache lives in $XDG_CACHE_HOME/pyvmm/vmlinux/ (default ~/.cache/pyvmm/vmlinux/),
one file per bzImage named by the bzImage's sha256.  Files are written to a temporary
name and renamed into place, so a reader never sees half a kernel; a cached file that
no longer verifies is extracted again.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from pathlib import Path

from ...user_cache import user_cache
from ..entry import LoaderError, format_size
from .bzimage import parse_setup_header, payload_of
from .decompress import decompress_payload, payload_format
from .pvh import elf_extent, verify_vmlinux

logger = logging.getLogger(__name__)


def cache_directory() -> Path:
    return user_cache("vmlinux")


def vmlinux_from_bzimage(data: bytes) -> bytes:
    """Decompress a bzImage's payload and return the ELF vmlinux in it, verified (no cache)."""
    header = parse_setup_header(data)
    payload = payload_of(data, header)
    fmt = payload_format(payload)
    started = time.monotonic()
    raw = decompress_payload(payload, fmt)
    try:
        end = elf_extent(raw)
    except LoaderError as exc:
        raise LoaderError(f"the bzImage's {fmt} payload is not an ELF vmlinux: {exc}") from None
    vmlinux = raw[:end] if end < len(raw) else raw
    verify_vmlinux(vmlinux)
    logger.info("decompressed the %s payload (%s) to a %s vmlinux in %.2f s", fmt,
                format_size(len(payload)), format_size(len(vmlinux)), time.monotonic() - started)
    return vmlinux


def extract_vmlinux(bzimage_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of the cached ELF vmlinux of the bzImage at `bzimage_path`, extracting it if needed."""
    name = os.fsdecode(bzimage_path)
    try:
        with open(bzimage_path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LoaderError(f"{name}: cannot read kernel: {exc.strerror or exc}") from None
    return extract_vmlinux_data(data, cache_dir=cache_dir)


def extract_vmlinux_data(data: bytes, *, cache_dir: str | os.PathLike | None = None,
                         data_sha256: str | None = None) -> Path:
    """Like extract_vmlinux, for the bzImage's bytes (`data_sha256`: their sha256, if known)."""
    parse_setup_header(data)  # fail on a non-bzImage before touching the cache
    directory = Path(cache_dir) if cache_dir is not None else cache_directory()
    if data_sha256 is None:
        import hashlib  # (here: a caller with the digest remembered does not start OpenSSL)

        data_sha256 = hashlib.sha256(data).hexdigest()
    path = directory / f"{data_sha256}.vmlinux"
    if _cached_ok(path):
        logger.debug("using cached vmlinux %s", path)
        return path
    vmlinux = vmlinux_from_bzimage(data)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        import tempfile  # (here: a vmlinux found in the cache writes none)

        fd, tmp = tempfile.mkstemp(prefix=".vmlinux-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(vmlinux)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise LoaderError(f"cannot write the extracted vmlinux to {directory}: {exc.strerror or exc} "
                          f"(set XDG_CACHE_HOME to a writable directory)") from None
    logger.info("cached the extracted vmlinux as %s", path)
    return path


def _cached_ok(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return False
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                verify_vmlinux(view)
        return True
    except FileNotFoundError:
        return False
    except (OSError, ValueError, LoaderError) as exc:
        logger.warning("cached vmlinux %s is unusable (%s); extracting it again", path, exc)
        return False
