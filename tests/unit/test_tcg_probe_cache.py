"""The software CPU's probe results are kept per libunicorn build, and never trusted unverified."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("unicorn")

from pyvmm.accel.tcg import engine_state, private_state, probe_cache  # noqa: E402


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(private_state, "_cached", None)
    monkeypatch.setattr(engine_state, "_cached", None)
    return tmp_path


def _cache_file(cache_home):
    files = list((cache_home / "pyvmm" / "tcg").glob("unicorn-*.json"))
    assert len(files) == 1, files
    return files[0]


def test_offsets_found_once_are_read_back(cache_home, monkeypatch):
    found = private_state.context_offsets()
    stored = json.loads(_cache_file(cache_home).read_text())
    assert stored["context_offsets"] == dataclasses.asdict(found)
    monkeypatch.setattr(private_state, "_cached", None)
    monkeypatch.setattr(private_state, "discover_offsets", lambda: pytest.fail("probed again despite the cache"))
    assert private_state.context_offsets() == found


def test_wrong_cached_offsets_are_rejected_and_found_again(cache_home, monkeypatch):
    right = engine_state.engine_offsets()
    path = _cache_file(cache_home)
    stored = json.loads(path.read_text())
    stored["engine_offsets"]["invalid_error"] += 8  # e.g. a library replaced in place, same size and time
    path.write_text(json.dumps(stored))
    monkeypatch.setattr(engine_state, "_cached", None)
    assert engine_state.engine_offsets() == right
    assert json.loads(path.read_text())["engine_offsets"] == dataclasses.asdict(right)


def test_an_unwritable_cache_only_costs_the_probe(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    calls = []
    value = probe_cache.remembered("example", lambda: calls.append(1) or 42, to_json=int, from_json=int)
    assert value == 42 and calls == [1]
