"""A strict reader of newc cpio archives, written independently of pyvmm's writer."""

from __future__ import annotations

import re

FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor", "rdevmajor",
          "rdevminor", "namesize", "check")


def read_newc(data: bytes) -> list[dict]:
    """Parse a newc archive strictly: magic, hex fields, 4-byte alignment, a final trailer."""
    entries, offset = [], 0
    while True:
        assert offset % 4 == 0, f"header at unaligned offset {offset}"
        assert data[offset:offset + 6] == b"070701", f"bad magic at {offset}"
        raw = data[offset + 6:offset + 110]
        assert re.fullmatch(rb"[0-9A-F]{104}", raw), "header fields must be 8 upper-case hex digits"
        header = {name: int(raw[i * 8:i * 8 + 8], 16) for i, name in enumerate(FIELDS)}
        name_start = offset + 110
        name = data[name_start:name_start + header["namesize"]]
        assert name.endswith(b"\0") and b"\0" not in name[:-1]
        data_start = name_start + header["namesize"]
        assert data_start % 4 == 0 or data[data_start:data_start + (-data_start % 4)] == b"\0" * (-data_start % 4)
        data_start += -data_start % 4
        header["name"] = name[:-1].decode()
        header["data"] = data[data_start:data_start + header["filesize"]]
        assert header["check"] == 0
        offset = data_start + header["filesize"]
        padding = -offset % 4
        assert data[offset:offset + padding] == b"\0" * padding
        offset += padding
        if header["name"] == "TRAILER!!!":
            assert offset == len(data), "bytes after the trailer"
            return entries
        entries.append(header)
