"""Every input the fuzzers were seeded with (fuzz/corpus/NAME) and every crash they found
(fuzz/regressions/NAME, each fixed) goes through its harness again, uninstrumented: it must
return normally (the harness asserts the outcome pyvmm documents for bad input). The harnesses
themselves run coverage-guided under atheris in scripts/test (fuzz/run.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))

from harnesses import HARNESSES, load  # noqa: E402

CASES = sorted((name, path) for name in HARNESSES for kind in ("corpus", "regressions")
               for path in (FUZZ / kind / name).glob("*") if path.is_file())


def test_every_harness_has_seeds():
    seeded = {name for name, path in CASES if path.parent.parent.name == "corpus"}
    assert seeded == set(HARNESSES)


def test_found_crashes_are_kept_as_regressions():
    assert any(path.parent.parent.name == "regressions" for _, path in CASES)


@pytest.mark.parametrize("name,path", CASES, ids=[f"{n}/{p.parent.parent.name}/{p.name}" for n, p in CASES])
def test_input_is_handled(name, path):
    load(name)(path.read_bytes())
