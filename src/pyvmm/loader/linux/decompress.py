"""Decompress the vmlinux a bzImage carries, on the host instead of in the guest.

The payload format is told by its first bytes.  Whatever the format, the kernel's
build appends the uncompressed size as a little-endian u32 (for gzip it is the
gzip trailer's ISIZE): the output must be exactly that long.

gzip, bzip2, lzma and xz use the standard library; zstd needs the `zstandard`
package and lz4 the `lz4` package, imported only when such a payload turns up.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib

from ..entry import LoaderError, format_size

MAX_VMLINUX = 1 << 30           # refuse payloads claiming more than 1 GiB uncompressed

GZIP, BZIP2, LZMA, XZ, LZO, LZ4, ZSTD = "gzip", "bzip2", "lzma", "xz", "lzo", "lz4", "zstd"

# (magic, format), longest first where prefixes could clash
MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", XZ),
    (b"\x89LZO", LZO),
    (b"\x02\x21\x4c\x18", LZ4),  # legacy frame (lz4 -l), magic 0x184C2102
    (b"\x28\xb5\x2f\xfd", ZSTD),
    (b"\x5d\x00\x00", LZMA),
    (b"\x1f\x8b", GZIP),
    (b"BZh", BZIP2),
)

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20      # uncompressed size of every block but the last


def payload_format(payload: bytes | memoryview) -> str:
    """The compression of a bzImage payload, from its magic bytes."""
    head = bytes(payload[:6])
    for magic, name in MAGICS:
        if head.startswith(magic):
            return name
    raise LoaderError(f"unknown bzImage payload compression (magic bytes {head.hex(' ') or 'none'})")


def expected_size(payload: bytes | memoryview) -> int:
    """The uncompressed size the build appended to the payload."""
    if len(payload) < 8:
        raise LoaderError(f"bzImage payload is only {len(payload)} bytes")
    size = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if size == 0 or size > MAX_VMLINUX:
        raise LoaderError(f"bzImage payload claims an uncompressed size of {size} bytes "
                          f"(expected 1 byte to {format_size(MAX_VMLINUX)})")
    return size


def decompress_payload(payload: bytes | memoryview, fmt: str | None = None) -> bytes:
    """The uncompressed kernel (an ELF vmlinux, possibly followed by relocation data)."""
    fmt = fmt or payload_format(payload)
    if fmt == LZO:
        raise LoaderError("bzImage payload is LZO-compressed, which pyvmm cannot decompress "
                          "(boot it with the 64-bit boot protocol instead)")
    size = expected_size(payload)
    try:
        if fmt == GZIP:
            out, complete = _stdlib(zlib.decompressobj(16 + zlib.MAX_WBITS), payload, size)
        elif fmt == BZIP2:
            out, complete = _stdlib(bz2.BZ2Decompressor(), payload, size)
        elif fmt == XZ:
            out, complete = _stdlib(lzma.LZMADecompressor(lzma.FORMAT_XZ), payload, size)
        elif fmt == LZMA:
            out, complete = _stdlib(lzma.LZMADecompressor(lzma.FORMAT_ALONE), payload, size)
        elif fmt == ZSTD:
            out, complete = _zstd(payload, size)
        elif fmt == LZ4:
            out, complete = _lz4_legacy(payload, size)
        else:
            raise LoaderError(f"unknown bzImage payload compression {fmt!r}")
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        raise LoaderError(f"corrupt {fmt} payload in bzImage: {exc}") from None
    if len(out) > size:
        raise LoaderError(f"corrupt {fmt} payload in bzImage: it decompresses to more than the "
                          f"{size} bytes its size trailer gives")
    if len(out) < size or not complete:
        raise LoaderError(f"truncated or corrupt {fmt} payload in bzImage: it decompresses to {len(out)} "
                          f"bytes{'' if complete else ' and ends early'}, its size trailer gives {size}")
    return out


def _stdlib(decompressor, payload: bytes | memoryview, size: int) -> tuple[bytes, bool]:
    """Run a zlib/bz2/lzma decompressor object, producing at most size+1 bytes."""
    out = decompressor.decompress(payload, size + 1)
    return out, decompressor.eof


def _zstd(payload: bytes | memoryview, size: int) -> tuple[bytes, bool]:
    try:
        import zstandard
    except ImportError:
        raise LoaderError("bzImage payload is zstd-compressed: decompressing it needs the Python package "
                          "zstandard: pip install zstandard") from None
    try:
        # fed in small pieces so that a forged payload cannot expand far beyond `size`
        dobj = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        view = memoryview(payload)
        chunks, total = [], 0
        for start in range(0, len(view), 4096):
            chunk = dobj.decompress(view[start:start + 4096])
            chunks.append(chunk)
            total += len(chunk)
            if total > size or dobj.eof:
                break
        return b"".join(chunks), dobj.eof
    except zstandard.ZstdError as exc:
        raise LoaderError(f"corrupt zstd payload in bzImage: {exc}") from None


def _lz4_legacy(payload: bytes | memoryview, size: int) -> tuple[bytes, bool]:
    """The legacy lz4 frame the kernel uses: magic, then (u32 LE length, block) until the end."""
    try:
        import lz4.block
    except ImportError:
        raise LoaderError("bzImage payload is LZ4-compressed: decompressing it needs the Python package "
                          "lz4: pip install lz4") from None
    view = memoryview(payload)
    bound = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16  # LZ4_compressBound(8 MiB)
    chunks, total, pos, end = [], 0, 4, len(view)
    while pos < end:
        if end - pos < 4:
            raise LoaderError(f"truncated lz4 payload in bzImage: {end - pos} stray bytes at its end")
        length = struct.unpack_from("<I", view, pos)[0]
        if end - pos == 4 and length == total:
            break                                  # the size trailer
        pos += 4
        if length == LZ4_LEGACY_MAGIC:             # a concatenated legacy frame
            continue
        if length == 0 or length > bound:
            raise LoaderError(f"corrupt lz4 payload in bzImage: block of {length} bytes at offset {pos - 4:#x}")
        if pos + length > end:
            raise LoaderError(f"truncated lz4 payload in bzImage: block of {length} bytes at offset "
                              f"{pos - 4:#x} runs past its end")
        try:
            block = lz4.block.decompress(view[pos:pos + length], uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as exc:
            raise LoaderError(f"corrupt lz4 payload in bzImage: block at offset {pos - 4:#x}: {exc}") from None
        pos += length
        chunks.append(block)
        total += len(block)
        if total > size:
            break
    return b"".join(chunks), True
