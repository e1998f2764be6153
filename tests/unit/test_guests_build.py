"""Build every bundled guest and check the ELF (and Multiboot) headers.

Guests are not run here; these tests only need GNU binutils.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading

import pytest

from pyvmm import guests
from pyvmm.guests import GUESTS, GuestBuildError, build, build_source

needs_binutils = pytest.mark.skipif(
    not (shutil.which("as") and shutil.which("ld")), reason="GNU binutils (as/ld) not installed"
)

MB_MAGIC = 0x1BADB002
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pyvmm" / "guests"


def parse_elf(data: bytes):
    assert data[:4] == b"\x7fELF"
    elf_class, endian = data[4], data[5]
    assert endian == 1  # little-endian
    if elf_class == 1:
        e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIII", data, 16)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
        phdr_fmt = "<IIIIIIII"  # type, offset, vaddr, paddr, filesz, memsz, flags, align
        segments = []
        for i in range(e_phnum):
            p = struct.unpack_from(phdr_fmt, data, e_phoff + i * e_phentsize)
            segments.append(dict(type=p[0], offset=p[1], vaddr=p[2], paddr=p[3], filesz=p[4], memsz=p[5]))
    else:
        assert elf_class == 2
        e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIQQ", data, 16)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
        segments = []
        for i in range(e_phnum):
            # type, flags, offset, vaddr, paddr, filesz, memsz, align
            p = struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
            segments.append(dict(type=p[0], offset=p[2], vaddr=p[3], paddr=p[4], filesz=p[5], memsz=p[6]))
    return dict(elf_class=elf_class, type=e_type, machine=e_machine, entry=e_entry, segments=segments)


def find_multiboot_header(data: bytes):
    for off in range(0, min(len(data), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MB_MAGIC:
            return off, flags, checksum
    return None


def test_guest_table():
    assert set(GUESTS) == {"hello", "echo", "smp", "triple", "hello64", "calibrate", "exitbench", "faults", "dirtier"}
    for name, info in GUESTS.items():
        assert info.name == name
        assert info.bits in (32, 64)
        assert info.purpose and "\n" not in info.purpose
        assert guests.source_path(name).is_file()
    assert guests.LINKER_SCRIPT.is_file()
    assert GUESTS["hello64"].bits == 64 and GUESTS["calibrate"].bits == 64
    assert GUESTS["hello"].multiboot and not GUESTS["hello64"].multiboot


def test_unknown_guest():
    with pytest.raises(GuestBuildError, match="unknown guest"):
        build("no-such-guest")


@needs_binutils
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_build_guest(name, private_cache):
    info = GUESTS[name]
    path = build(name)
    assert path.parent == private_cache
    elf = parse_elf(path.read_bytes())
    data = path.read_bytes()

    assert elf["type"] == 2  # ET_EXEC: static, not PIE
    if info.bits == 32:
        assert elf["elf_class"] == 1 and elf["machine"] == EM_386
    else:
        assert elf["elf_class"] == 2 and elf["machine"] == EM_X86_64

    loads = [s for s in elf["segments"] if s["type"] == PT_LOAD and s["memsz"]]
    assert loads
    for seg in loads:
        # pyvmm's loader only accepts low memory in [0x30000, 0x9fc00); all guests load at >= 1 MiB.
        assert seg["paddr"] >= 0x100000
        assert seg["paddr"] == seg["vaddr"]
        assert seg["memsz"] >= seg["filesz"]
        assert seg["offset"] + seg["filesz"] <= len(data)
    assert any(s["vaddr"] <= elf["entry"] < s["vaddr"] + s["filesz"] for s in loads)

    header = find_multiboot_header(data)
    if info.multiboot:
        assert header is not None, "no Multiboot header in the first 8 KiB"
        off, flags, checksum = header
        assert (MB_MAGIC + flags + checksum) & 0xFFFFFFFF == 0
        assert not flags & 0x10000  # ELF loading, no address fields
        assert flags & 0x2  # memory info requested
        # The header must be loaded: it lies in the file image of the first segment.
        assert any(s["offset"] <= off < s["offset"] + s["filesz"] for s in loads)
    else:
        assert header is None


@needs_binutils
def test_build_is_cached(private_cache):
    first = build("hello")
    mtime = first.stat().st_mtime_ns
    second = build("hello")
    assert second == first
    assert second.stat().st_mtime_ns == mtime
    # Nothing left behind but finished images.
    assert [p.name for p in private_cache.iterdir()] == [first.name]


@needs_binutils
def test_source_edit_rebuilds(tmp_path):
    src = tmp_path / "mini.S"
    src.write_text(".text\n.globl _start\n_start:\n    hlt\n")
    first = build_source(src, 64)
    src.write_text(".text\n.globl _start\n_start:\n    cli\n    hlt\n")
    second = build_source(src, 64)
    assert first != second
    assert first.is_file() and second.is_file()
    assert parse_elf(second.read_bytes())["machine"] == EM_X86_64


@needs_binutils
def test_include_edit_rebuilds(tmp_path):
    (tmp_path / "extra.inc").write_text("    nop\n")
    src = tmp_path / "withinc.S"
    src.write_text('.code32\n.text\n.globl _start\n_start:\n.include "extra.inc"\n    hlt\n')
    first = build_source(src, 32)
    (tmp_path / "extra.inc").write_text("    nop\n    nop\n")
    assert build_source(src, 32) != first


@needs_binutils
def test_assembler_error_reports_first_error(tmp_path):
    src = tmp_path / "bad.S"
    src.write_text(".text\n_start:\n    movl %eax\n    bogus_insn\n")
    with pytest.raises(GuestBuildError) as excinfo:
        build_source(src, 64)
    message = str(excinfo.value)
    assert "bad.S:3" in message and "Error" in message


def test_missing_binutils(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(GuestBuildError, match=r"GNU as/ld not found: install binutils"):
        build("hello")


@needs_binutils
def test_concurrent_builds_agree(private_cache):
    results, errors = [], []

    def worker():
        try:
            results.append(build("smp"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert parse_elf(results[0].read_bytes())["machine"] == EM_386
    assert [p.name for p in private_cache.iterdir()] == [results[0].name]


def test_cache_dir_honours_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert guests.cache_dir() == tmp_path / "pyvmm" / "guests"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored per the XDG spec
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert guests.cache_dir() == tmp_path / "home" / ".cache" / "pyvmm" / "guests"
    assert not os.path.exists(tmp_path / "home")
