"""Linux kernels: the x86 boot protocol (bzImage, 64-bit entry) and PVH direct boot of a vmlinux.

A distribution bzImage is normally booted through PVH: its compressed vmlinux is
decompressed on the host once (`extract_vmlinux`, cached by the bzImage's sha256) and
loaded directly, which skips the in-guest decompressor.  `load_bzimage` is the
classic 64-bit boot protocol, for kernels without a PVH note or when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .bzimage import SetupHeader, is_bzimage, load_bzimage, parse_setup_header, payload_of, place_initrd
    from .decompress import decompress_payload, payload_format
    from .extract import cache_directory, extract_vmlinux, extract_vmlinux_data, vmlinux_from_bzimage
    from .pvh import NoPvhNoteError, find_pvh_entry, load_pvh, verify_vmlinux

# loaded at first use (lazy_exports.py): telling an ELF kernel from a bzImage needs bzimage.py
# alone, a vmlinux found in the cache needs no decompressor
_SOURCES = {"SetupHeader": "bzimage", "is_bzimage": "bzimage", "load_bzimage": "bzimage",
            "parse_setup_header": "bzimage", "payload_of": "bzimage", "place_initrd": "bzimage",
            "decompress_payload": "decompress", "payload_format": "decompress",
            "cache_directory": "extract", "extract_vmlinux": "extract", "extract_vmlinux_data": "extract",
            "vmlinux_from_bzimage": "extract",
            "NoPvhNoteError": "pvh", "find_pvh_entry": "pvh", "load_pvh": "pvh", "verify_vmlinux": "pvh"}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
