"""A deterministic initramfs: the "newc" cpio format, gzip-compressed, written in Python.

The kernel unpacks initramfs archives in the SVR4 "newc" format (magic ``070701``),
see Documentation/driver-api/early-userspace/buffer-format.rst: every entry is a
110-byte ASCII header (13 eight-digit hex fields), the NUL-terminated name padded
so that header + name is a multiple of 4, then the data padded to 4.  The
archive ends with an entry named ``TRAILER!!!``.

Determinism: entries are written sorted by path (parents first), inode numbers
are assigned in that order, owners are root, mtimes are fixed (0 unless given),
and gzip's header carries no timestamp or name, so the same inputs give the
same bytes.

Also here: ``outb_helper_elf()``, a 300-byte static x86-64 program for the guest
(``pyvmm-outb PORT VALUE``: ioperm + outb), because the Debian cloud kernel is
built without /dev/port (CONFIG_DEVPORT is not set).
"""

from __future__ import annotations

import gzip
import stat
import struct
from dataclasses import dataclass, field

__all__ = [
    "CpioEntry",
    "Initramfs",
    "NEWC_MAGIC",
    "OUTB_HELPER_SOURCE",
    "OUTB_HELPER_CODE",
    "gzip_deterministic",
    "outb_helper_elf",
    "write_newc",
]

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110


@dataclass(frozen=True)
class CpioEntry:
    """One archive member.  ``path`` is relative ("bin/busybox"), ``mode`` includes the file type."""

    path: str
    mode: int
    data: bytes = b""  # file contents, or the symlink target
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes
    uid: int = 0
    gid: int = 0
    mtime: int = 0

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or "\0" in self.path:
            raise ValueError(f"bad cpio path {self.path!r}: must be relative, non-empty, without NUL")
        if any(part in ("", ".", "..") for part in self.path.split("/")):
            raise ValueError(f"bad cpio path {self.path!r}: empty, '.' or '..' component")
        if stat.S_IFMT(self.mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                                          stat.S_IFIFO, stat.S_IFSOCK):
            raise ValueError(f"bad cpio mode {self.mode:#o} for {self.path!r}: no file type")
        if self.data and stat.S_IFMT(self.mode) not in (stat.S_IFREG, stat.S_IFLNK):
            raise ValueError(f"{self.path!r}: only regular files and symlinks carry data")


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, filesize: int,
            rdev: tuple[int, int], namesize: int) -> bytes:
    fields = (ino, mode, uid, gid, nlink, mtime, filesize, 0, 0, rdev[0], rdev[1], namesize, 0)
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"cpio header field out of range: {value}")
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def _sort_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


def write_newc(entries: list[CpioEntry]) -> bytes:
    """Serialise `entries` (any order; duplicates rejected) as an uncompressed newc archive."""
    by_path: dict[str, CpioEntry] = {}
    for entry in entries:
        if entry.path in by_path:
            raise ValueError(f"duplicate cpio entry {entry.path!r}")
        by_path[entry.path] = entry
    out = bytearray()
    for ino, path in enumerate(sorted(by_path, key=_sort_key), start=1):
        entry = by_path[path]
        name = path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out += _header(ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, len(entry.data), entry.rdev,
                       len(name))
        out += name + _pad4(HEADER_SIZE + len(name))
        out += entry.data + _pad4(len(entry.data))
    name = TRAILER.encode() + b"\0"
    out += _header(0, 0, 0, 0, 1, 0, 0, (0, 0), len(name))
    out += name + _pad4(HEADER_SIZE + len(name))
    return bytes(out)


def gzip_deterministic(data: bytes, level: int = 9) -> bytes:
    """gzip without a timestamp or file name (the OS byte is fixed by Python)."""
    return gzip.compress(data, compresslevel=level, mtime=0)


@dataclass
class Initramfs:
    """An initramfs tree being assembled; `cpio()` / `cpio_gz()` give its bytes."""

    mtime: int = 0
    entries: dict[str, CpioEntry] = field(default_factory=dict)

    def _add(self, entry: CpioEntry) -> None:
        parent = entry.path.rpartition("/")[0]
        if parent:
            self.mkdir(parent)
        old = self.entries.get(entry.path)
        if old is not None and not (stat.S_ISDIR(old.mode) and old == entry):
            raise ValueError(f"{entry.path!r} already in the initramfs")
        self.entries[entry.path] = entry

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        existing = self.entries.get(path)
        if existing is not None:
            if not stat.S_ISDIR(existing.mode):
                raise ValueError(f"{path!r} exists and is not a directory")
            return
        self._add(CpioEntry(path, stat.S_IFDIR | mode, mtime=self.mtime))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(CpioEntry(path.strip("/"), stat.S_IFREG | mode, data=data, mtime=self.mtime))

    def symlink(self, path: str, target: str) -> None:
        self._add(CpioEntry(path.strip("/"), stat.S_IFLNK | 0o777, data=target.encode(), mtime=self.mtime))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(CpioEntry(path.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor), mtime=self.mtime))

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self.entries

    def cpio(self) -> bytes:
        return write_newc(list(self.entries.values()))

    def cpio_gz(self) -> bytes:
        return gzip_deterministic(self.cpio())


# --- pyvmm-outb: the guest's port I/O helper -------------------------------------------------
#
# Assembled from OUTB_HELPER_SOURCE with GNU as (x86-64); the bytes are checked against the
# source by tests/unit/test_images.py when binutils are installed.  Position-independent
# (relative jumps and calls only), so it runs at any load address.  Exit status 0 when the
# byte was written, 1 on bad arguments or when ioperm() failed.  On hosts where guest user
# mode runs in hardware ring 3 under KVM (kvm_pvm), the `out` may raise #GP: the process then
# dies with SIGSEGV and init falls back to other means.

OUTB_HELPER_SOURCE = """\
        .intel_syntax noprefix
        .text
        .globl _start
_start:
        cmp     qword ptr [rsp], 3      # argc == 3: pyvmm-outb PORT VALUE (decimal)
        jne     fail
        mov     rsi, [rsp + 16]
        call    atoi
        mov     r12, rax                # port
        mov     rsi, [rsp + 24]
        call    atoi
        cmp     rax, 255
        ja      fail
        mov     r13, rax                # value
        mov     eax, 173                # ioperm(port, 1, 1)
        mov     rdi, r12
        mov     esi, 1
        mov     edx, 1
        syscall
        test    rax, rax
        jnz     fail
        mov     edx, r12d
        mov     eax, r13d
        out     dx, al
        xor     edi, edi
        jmp     exit
fail:
        mov     edi, 1
exit:
        mov     eax, 60                 # exit(edi)
        syscall
atoi:                                   # rsi: NUL-terminated decimal -> rax; empty, bad digit or > 65535 -> fail
        xor     eax, eax
        movzx   ecx, byte ptr [rsi]
        test    ecx, ecx
        jz      fail
1:      movzx   ecx, byte ptr [rsi]
        test    ecx, ecx
        jz      2f
        sub     ecx, '0'
        cmp     ecx, 9
        ja      fail
        imul    rax, rax, 10
        add     rax, rcx
        cmp     rax, 65535
        ja      fail
        inc     rsi
        jmp     1b
2:      ret
"""

OUTB_HELPER_CODE = bytes.fromhex(
    "48833c24037546488b742410e8480000004989c4488b742418e83b000000483dff00000077274989c5"
    "b8ad0000004c89e7be01000000ba010000000f054885c0750b4489e24489e8ee31ffeb05bf01000000"
    "b83c0000000f0531c00fb60e85c974eb0fb60e85c9741c83e93083f90977dc486bc00a4801c8483dff"
    "ff000077cd48ffc6ebddc3"
)

_ELF_LOAD_ADDRESS = 0x400000


def outb_helper_elf() -> bytes:
    """A minimal static ELF64 executable around OUTB_HELPER_CODE (one R+X PT_LOAD segment)."""
    ehdr_size, phdr_size = 64, 56
    code_offset = ehdr_size + phdr_size
    total = code_offset + len(OUTB_HELPER_CODE)
    entry = _ELF_LOAD_ADDRESS + code_offset
    ehdr = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,      # ELFCLASS64, little-endian, EV_CURRENT, SYSV ABI
        2, 62, 1,                       # ET_EXEC, EM_X86_64, EV_CURRENT
        entry, ehdr_size, 0,            # e_entry, e_phoff, e_shoff
        0, ehdr_size, phdr_size, 1,     # e_flags, e_ehsize, e_phentsize, e_phnum
        0, 0, 0,                        # e_shentsize, e_shnum, e_shstrndx
    )
    phdr = struct.pack(
        "<IIQQQQQQ",
        1, 5,                           # PT_LOAD, PF_R | PF_X
        0, _ELF_LOAD_ADDRESS, _ELF_LOAD_ADDRESS,
        total, total, 0x1000,
    )
    return ehdr + phdr + OUTB_HELPER_CODE


# --- pyvmm-vsock: the guest's vsock tool -----------------------------------------------------


def vsock_helper_source() -> bytes:
    from importlib import resources

    return resources.files(__package__).joinpath("vsock_helper.c").read_bytes()


def agent_source() -> bytes:
    from importlib import resources

    return resources.files(__package__).joinpath("agent.c").read_bytes()


def agent_elf(work_dir, cc: str = "gcc") -> bytes:
    """Compile agent.c (the guest agent, pyvmm/agent/protocol.py) into a static executable
    with the host's gcc and C library (libc6-dev)."""
    return _compile_static(work_dir, cc, "agent.c", agent_source(), "pyvmm-agent", [],
                           what="the guest agent", needs="gcc libc6-dev")


def vsock_helper_elf(work_dir, cc: str = "gcc") -> bytes:
    """Compile vsock_helper.c into a static, libc-free executable with the host's gcc."""
    flags = ["-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector",
             "-fno-asynchronous-unwind-tables", "-fno-pie", "-no-pie"]
    return _compile_static(work_dir, cc, "vsock_helper.c", vsock_helper_source(), "pyvmm-vsock", flags,
                           what="the guest's pyvmm-vsock tool", needs="gcc")


def _compile_static(work_dir, cc: str, source_name: str, source: bytes, output_name: str, flags: list[str],
                    *, what: str, needs: str) -> bytes:
    """A static, stripped executable built from one C file; a missing compiler or a failed
    build is one line naming the packages it needs."""
    import pathlib
    import subprocess

    work = pathlib.Path(work_dir)
    source_path, output = work / source_name, work / output_name
    source_path.write_bytes(source)
    command = [cc, "-Os", "-static", *flags, "-s", "-Wl,--build-id=none", "-o", str(output), str(source_path)]
    try:
        subprocess.run(command, check=True, capture_output=True)
    except FileNotFoundError:
        raise OSError(f"{cc} not found: it builds {what} (apt-get install {needs})") from None
    except subprocess.CalledProcessError as exc:
        first = (exc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[0]
        raise OSError(f"compiling {what} failed (apt-get install {needs}): {first}") from None
    return output.read_bytes()
