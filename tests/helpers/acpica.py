"""ACPICA's tools (iasl, acpiexec) run on pyvmm's tables: the tests' independent reader."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest


def acpica_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install acpica-tools (apt-get install -y acpica-tools)")
    return path


def run(args, cwd, timeout=60) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{args} failed:\n{output}"
    return output


def disassemble_and_recompile(table: bytes, signature: bytes, expected: list[str], tmp_path,
                              allowed_errors: tuple[str, ...] = ()) -> bytes:
    """Disassemble `table` with iasl (no errors or warnings, every `expected` text present,
    whitespace-insensitive), compile the disassembly back and return the recompiled bytes.
    `allowed_errors`: compiler errors expected (each exactly once): iasl then compiles with -f."""
    iasl = acpica_tool("iasl")
    name = signature.decode().lower()
    (tmp_path / f"{name}.dat").write_bytes(table)
    output = run([iasl, "-d", f"{name}.dat"], tmp_path)
    assert not re.search(r"error|warning", output, re.I), output
    dsl = (tmp_path / f"{name}.dsl").read_text()
    assert not re.search(r"incorrect|invalid|\*\*\*\*|unknown", dsl, re.I), dsl
    flat = re.sub(r"\s+", " ", dsl)
    for text in expected:
        assert re.sub(r"\s+", " ", text) in flat, f"{text!r} not in the {name} disassembly:\n{dsl}"
    (tmp_path / f"{name}.dat").unlink()
    if allowed_errors:
        result = subprocess.run([iasl, "-f", f"{name}.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
        errors = re.findall(r"^Error\s+\d+ - .*?\^ (.*)$", output, re.M)
        assert sorted(errors) == sorted(allowed_errors), output
        assert not re.search(r"[1-9]\d* warnings", output, re.I), output
    else:
        output = run([iasl, f"{name}.dsl"], tmp_path)
        assert not re.search(r"[1-9]\d* (errors|warnings)", output, re.I), output
    return (tmp_path / f"{name}.aml").read_bytes()
