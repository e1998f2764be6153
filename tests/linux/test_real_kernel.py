"""The loader on the real Debian cloud kernel: LZ4 payload, PVH note, extraction cache."""

from __future__ import annotations

import struct
import time

from pyvmm.arch.x86_64.layout import PVH_START_INFO, ram_regions
from pyvmm.loader import CpuMode, load_kernel
from pyvmm.loader.linux import extract_vmlinux, find_pvh_entry, parse_setup_header
from pyvmm.memory import GuestMemory

MiB = 1 << 20
XLF_KERNEL_64 = 1 << 0  # boot.rst: xloadflags bit 0, a 64-bit entry at load address + 0x200


# --- the real Debian kernel ------------------------------------------------------------------

def test_real_debian_bzimage(image, tmp_path):
    kernel = image.kernel
    data = kernel.read_bytes()
    header = parse_setup_header(data)
    assert header.version >= 0x020C and header.xloadflags & XLF_KERNEL_64
    assert header.relocatable and header.init_size > header.kernel_size
    payload = data[header.setup_size + header.payload_offset:][:header.payload_length]
    assert payload[:4] == b"\x02\x21\x4c\x18", "Debian's cloud kernel uses a legacy LZ4 payload"

    cache = tmp_path / "cache"
    started = time.monotonic()
    path = extract_vmlinux(kernel, cache_dir=cache)
    first = time.monotonic() - started
    vmlinux = path.read_bytes()
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[4] == 2 and struct.unpack_from("<H", vmlinux, 18)[0] == 62
    entry = find_pvh_entry(vmlinux)
    assert entry is not None and 0x1000000 <= entry < 0x1000000 + header.init_size
    mtime = path.stat().st_mtime_ns
    started = time.monotonic()
    assert extract_vmlinux(kernel, cache_dir=cache) == path
    again = time.monotonic() - started
    assert path.stat().st_mtime_ns == mtime and len(list(cache.iterdir())) == 1
    print(f"payload {len(payload)} bytes -> vmlinux {len(vmlinux)} bytes; extraction {first:.2f} s, "
          f"cached {again:.3f} s; PVH entry {entry:#x}; pref_address {header.pref_address:#x}; "
          f"init_size {header.init_size:#x}")

    with GuestMemory.from_specs(ram_regions(256 * MiB)) as memory:
        boot = load_kernel(memory, kernel, cmdline="console=ttyS0", cache_dir=cache)
        assert boot.mode is CpuMode.PROTECTED_32 and boot.entry == entry
        assert memory.read_u32(PVH_START_INFO) == 0x336EC578
    with GuestMemory.from_specs(ram_regions(256 * MiB)) as memory:
        boot = load_kernel(memory, kernel, boot="bzimage")
        assert boot.mode is CpuMode.LONG_64
        assert boot.entry == header.pref_address + 0x200
