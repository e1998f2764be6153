"""Building the default image from Debian's packages (a second, private build: ~28 MB download)."""

from __future__ import annotations

import gzip
import re

import pytest
from helpers.newc import read_newc

from pyvmm.images import build_default_image
from pyvmm.images.modules import DEFAULT_MODULES, module_name


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pyvmm" / "images"

# --- the real thing ------------------------------------------------------------------------

class TestRealImage:
    def test_build_is_complete_and_deterministic(self, private_cache):
        image = build_default_image(progress=None)
        assert re.fullmatch(r"6\.1\.0-\d+-cloud-amd64", image.kernel_version)
        assert image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # bzImage boot protocol header
        entries = {e["name"]: e for e in read_newc(gzip.decompress(image.initramfs.read_bytes()))}
        moddir = f"lib/modules/{image.kernel_version}"
        for path in ("init", "bin/busybox", "bin/sh", "bin/pyvmm-outb", "dev/console", f"{moddir}/modules.dep",
                     f"{moddir}/pyvmm.load"):
            assert path in entries, path
        load = entries[f"{moddir}/pyvmm.load"]["data"].decode().split("\n")
        loaded = [line.split()[0] for line in load if line]
        defaults = [module_name(m) for m in DEFAULT_MODULES]
        assert [name for name in loaded if name in defaults] == defaults  # every default, in order
        assert loaded.index("pvpanic") < loaded.index("pvpanic_mmio")  # dependencies come first
        for line in filter(None, load):
            assert entries[f"{moddir}/{line.split()[1]}"]["data"][:4] == b"\x7fELF"
        # deterministic: a rebuild gives the same initramfs bytes
        first = image.initramfs.read_bytes()
        assert build_default_image(rebuild=True, progress=None).initramfs.read_bytes() == first
