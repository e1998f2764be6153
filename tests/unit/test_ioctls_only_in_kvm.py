"""ioctl(2) is issued only in pyvmm/kvm (README, Architecture): no other module calls an
`ioctl`, whether fcntl's, libc's through ctypes or a re-export. The import contract in
pyproject.toml ([tool.importlinter]) keeps kvm/fd.py and kvm/ioctls.py kvm/'s own; this test
catches the calls that need no import from pyvmm.kvm."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "pyvmm"

# Host devices that are not KVM's, with ioctls of their own (TUN/TAP offloads and vnet headers
# on /dev/net/tun, vhost-net's feature query), and this process's own page tables
# (userfaultfd and /proc/self/pagemap: dirty tracking, lazy restore): these modules wrap them,
# as kvm/ wraps KVM's.
NON_KVM_IOCTLS = {"net/tap.py", "net/vhost.py", "memory/userfaultfd.py"}


def ioctl_calls(source: str) -> list[int]:
    """Line numbers of calls to anything named `ioctl` (a function, or an attribute of
    fcntl, a ctypes library or any other object)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name == "ioctl":
                lines.append(node.lineno)
    return lines


def test_only_kvm_issues_ioctls():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative.startswith("kvm/") or relative in NON_KVM_IOCTLS:
            continue
        found += [f"{relative}:{line}" for line in ioctl_calls(path.read_text())]
    assert found == []


def test_the_exceptions_still_issue_ioctls():
    """A listed module that no longer needs its exception leaves the list."""
    for relative in NON_KVM_IOCTLS:
        assert ioctl_calls((SRC / relative).read_text()), relative


def test_the_scan_finds_every_spelling():
    source = (
        "import fcntl, ctypes\n"
        "from fcntl import ioctl\n"
        "fcntl.ioctl(3, 0x1234)\n"
        "ctypes.CDLL(None).ioctl(3, 0)\n"
        "ioctl(3, 0)\n"
        "fcntl.fcntl(3, fcntl.F_GETFL)\n"
    )
    assert ioctl_calls(source) == [3, 4, 5]
