"""Linux kernels: the x86 boot protocol (bzImage, 64-bit entry) and PVH direct boot of a vmlinux.

A distribution bzImage is normally booted through PVH: its compressed vmlinux is
decompressed on the host once (`extract_vmlinux`, cached by the bzImage's sha256) and
loaded directly, which skips the in-guest decompressor.  `load_bzimage` is the
classic 64-bit boot protocol, for kernels without a PVH note or when asked for.
"""

from __future__ import annotations

from .bzimage import SetupHeader, is_bzimage, load_bzimage, parse_setup_header, payload_of, place_initrd
from .decompress import decompress_payload, payload_format
from .extract import cache_directory, extract_vmlinux, extract_vmlinux_data, vmlinux_from_bzimage
from .pvh import NoPvhNoteError, find_pvh_entry, load_pvh, verify_vmlinux

__all__ = [
    "NoPvhNoteError",
    "SetupHeader",
    "cache_directory",
    "decompress_payload",
    "extract_vmlinux",
    "extract_vmlinux_data",
    "find_pvh_entry",
    "is_bzimage",
    "load_bzimage",
    "load_pvh",
    "parse_setup_header",
    "payload_format",
    "payload_of",
    "place_initrd",
    "verify_vmlinux",
    "vmlinux_from_bzimage",
]
