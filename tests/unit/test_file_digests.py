"""file_digests: a file's sha256 remembered across runs while the file is unchanged."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from pyvmm import file_digests


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "pyvmm" / file_digests.MEMO_FILE


@pytest.fixture
def settled(monkeypatch):
    """Files written by the test count as old enough to remember (they are milliseconds old)."""
    monkeypatch.setattr(file_digests, "RACY_SECONDS", -1.0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plant(memo_path, path, digest: str) -> None:
    """Overwrite the remembered digest of `path`: a later answer of `digest` came from the memo."""
    memo = json.loads(memo_path.read_text())
    memo[os.path.abspath(path)][5] = digest
    memo_path.write_text(json.dumps(memo))


def test_digest_is_the_files_sha256(tmp_path):
    path = tmp_path / "kernel"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # more than one read chunk
    assert file_digests.sha256_file(path) == sha(path.read_bytes())


def test_unchanged_file_answered_from_the_memo(tmp_path, private_cache, settled):
    path = tmp_path / "kernel"
    path.write_bytes(b"kernel bytes")
    assert file_digests.sha256_file(path) == sha(b"kernel bytes")
    plant(private_cache, path, "remembered")
    assert file_digests.sha256_file(path) == "remembered"
    # under another name for the same file (a symlink): an entry of its own (names are not
    # resolved: that costs a system call per path component), remembered from then on
    link = tmp_path / "link"
    link.symlink_to(path)
    assert file_digests.sha256_file(link) == sha(b"kernel bytes")
    plant(private_cache, link, "remembered under the link")
    assert file_digests.sha256_file(link) == "remembered under the link"
    assert file_digests.sha256_file(path) == "remembered"


@pytest.mark.parametrize("change", ["size", "replaced", "times"])
def test_a_changed_file_is_hashed_again(tmp_path, private_cache, settled, change):
    path = tmp_path / "kernel"
    path.write_bytes(b"old contents")
    file_digests.sha256_file(path)
    plant(private_cache, path, "stale")
    if change == "size":
        path.write_bytes(b"new, longer contents")
    elif change == "replaced":  # a new inode under the old name, same size
        (tmp_path / "new").write_bytes(b"new contents")
        os.replace(tmp_path / "new", path)
    else:  # same inode and size, other bytes; the times move (here: set, as a coarse clock might not)
        path.write_bytes(b"OLD CONTENTS")
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert file_digests.sha256_file(path) == sha(path.read_bytes())


def test_a_file_written_just_now_is_not_remembered(tmp_path, private_cache):
    # its times could still be those of a write in the same clock tick after the hash
    path = tmp_path / "kernel"
    path.write_bytes(b"fresh")
    assert file_digests.sha256_file(path) == sha(b"fresh")
    assert not private_cache.exists()


def test_a_file_changed_while_read_is_not_remembered(tmp_path, private_cache, settled):
    path = tmp_path / "kernel"
    path.write_bytes(b"first")
    before = os.stat(path)
    path.write_bytes(b"second, longer")
    after = os.stat(path)
    assert file_digests.sha256_of_read(path, before, after, b"first") == sha(b"first")
    assert not private_cache.exists()
    # unchanged across the read: remembered, and known next time
    assert file_digests.sha256_of_read(path, after, after, b"second, longer") == sha(b"second, longer")
    assert file_digests.known_sha256(path, os.stat(path)) == sha(b"second, longer")


@pytest.mark.parametrize("memo", [b"not json", b"[1, 2]", b'{"/x": "not a list"}', b'{"/x": [1, 2, 3, 4, 5, 6]}'])
def test_a_corrupt_memo_only_means_hashing_again(tmp_path, private_cache, settled, memo):
    private_cache.parent.mkdir(parents=True)
    private_cache.write_bytes(memo)
    path = tmp_path / "kernel"
    path.write_bytes(b"contents")
    assert file_digests.sha256_file(path) == sha(b"contents")
    assert json.loads(private_cache.read_text())[os.path.abspath(path)][5] == sha(b"contents")


def test_an_unwritable_cache_only_means_hashing_again(tmp_path, monkeypatch, settled):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")  # a file where the cache directory would be
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    path = tmp_path / "kernel"
    path.write_bytes(b"contents")
    assert file_digests.sha256_file(path) == sha(b"contents")
    assert file_digests.sha256_file(path) == sha(b"contents")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "kernel"]  # nothing left behind


def test_the_memo_keeps_the_most_recent_files(tmp_path, private_cache, settled, monkeypatch):
    monkeypatch.setattr(file_digests, "MAX_ENTRIES", 3)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(b"%d" % i)
        file_digests.sha256_file(paths[-1])
    assert list(json.loads(private_cache.read_text())) == [os.path.abspath(p) for p in paths[2:]]
    assert not list(private_cache.parent.glob(".file-digests*"))  # no temporary files left


def test_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        file_digests.sha256_file(tmp_path / "missing")


def test_store_replaces_a_cache_file_whole(tmp_path):
    from pyvmm.user_cache import store

    path = tmp_path / "new" / "dir" / "cache.bin"
    store(path, b"first")
    store(path, b"second")
    assert path.read_bytes() == b"second" and (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["cache.bin"]  # no temporary file left
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        store(tmp_path / "file" / "cache.bin", b"x")  # its directory cannot be made
