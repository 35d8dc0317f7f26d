"""A cache that cannot be written (a read-only mount, a cache baked into an image, files in a
folder this process may not write) serves its hits, computes its misses with one warning, and
is never modified.

Root ignores permission bits, and these tests run as root here: the mount test uses a real
read-only bind mount (``mount --bind -o ro``, skipped where mounting is not allowed), and the
permission test, run as root, injects what ``access(2)`` answers any other user for a folder of
mode 0555.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embeddingcache import EmbeddingCache, EmbeddingCacheWarning

TEXTS = ["first stored text", "second stored text", "third stored text"]


def _fill(directory: Path, model: str) -> np.ndarray:
    with EmbeddingCache(model, cache_dir=directory, device="cpu", remote_url=False) as cache:
        return cache.get_embeddings(TEXTS)


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file's name and the digest of its bytes."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``(source, mount)``: a folder, and the same folder mounted read-only."""
    source, mount = tmp_path / "source", tmp_path / "mount"
    source.mkdir()
    mount.mkdir()
    done = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(source), str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.decode().strip()}")
    try:
        yield source, mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_cache_on_a_read_only_mount_serves_hits_computes_misses_and_is_never_modified(
    tiny_model: str, read_only_mount: tuple[Path, Path]
) -> None:
    source, mount = read_only_mount
    stored = _fill(source, tiny_model)
    before = _snapshot(source)
    assert not any(name.endswith(("-wal", "-shm")) for name in before)  # closed cleanly
    with pytest.raises(OSError, match="Read-only file system"):
        (mount / "probe").write_bytes(b"")  # the mount is really read-only

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with EmbeddingCache(tiny_model, cache_dir=mount, device="cpu", remote_url=False) as cache:
            hits = cache.get_embeddings(TEXTS)
            assert not [w for w in caught if issubclass(w.category, EmbeddingCacheWarning)]
            mixed = cache.get_embeddings([*TEXTS, "a text never stored"])
            stats = cache.stats
    np.testing.assert_array_equal(hits, stored)
    np.testing.assert_array_equal(mixed[:3], stored)
    assert mixed.shape == (4, stored.shape[1]) and np.isfinite(mixed[3]).all()
    ours = [w for w in caught if issubclass(w.category, EmbeddingCacheWarning)]
    assert len(ours) == 1 and "read-only" in str(ours[0].message)
    assert stats["hits"] == 6 and stats["computed"] == 1
    assert _snapshot(source) == before


def test_a_cache_in_a_folder_it_may_not_write_serves_hits_and_is_never_modified(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "cache"
    stored = _fill(directory, tiny_model)
    before = _snapshot(directory)
    directory.chmod(0o555)
    if os.geteuid() == 0:
        # Root ignores the bits (and this interpreter is not one an unprivileged child may
        # run): the fault injected is what access(2) answers any other user.
        real_access = os.access

        def access(path: os.PathLike[str] | str, mode: int, **kwargs: object) -> bool:
            if Path(path) == directory and mode & os.W_OK:
                return False
            return real_access(path, mode)

        monkeypatch.setattr("embeddingcache.storage.sqlite.os.access", access)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with EmbeddingCache(
                tiny_model, cache_dir=directory, device="cpu", remote_url=False
            ) as cache:
                hits = cache.get_embeddings(TEXTS)
                cache.get_embeddings(["a text never stored", "another"])
                cache.get_embeddings(["a text never stored"])
    finally:
        directory.chmod(0o755)
    np.testing.assert_array_equal(hits, stored)
    ours = [w for w in caught if issubclass(w.category, EmbeddingCacheWarning)]
    assert len(ours) == 2 and all("read-only" in str(w.message) for w in ours)  # one a call
    assert _snapshot(directory) == before


def test_a_read_only_shard_of_the_schema_before_is_read_as_it_is(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, downgrade_to: Any
) -> None:
    """A cache baked by the release before (shards at s0005: rows keyed by their id) serves
    its hits from a folder it may not write, without an upgrade it could not make."""
    from sqlalchemy import create_engine

    directory = tmp_path / "cache"
    stored = _fill(directory, tiny_model)
    (shard,) = [p for p in directory.glob("*.db") if p.name != "hashstring.db"]
    engine = create_engine(f"sqlite:///{shard}")
    with engine.begin() as connection:
        downgrade_to(connection, "s0005")
    engine.dispose()
    before = _snapshot(directory)
    real_access = os.access

    def access(path: os.PathLike[str] | str, mode: int, **kwargs: object) -> bool:
        if Path(path) == directory and mode & os.W_OK:
            return False  # what access(2) answers for a folder this process may not write
        return real_access(path, mode)

    monkeypatch.setattr("embeddingcache.storage.sqlite.os.access", access)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with EmbeddingCache(tiny_model, cache_dir=directory, device="cpu", remote_url=False) as c:
            hits = c.get_embeddings(TEXTS)
            stats = c.stats
    np.testing.assert_array_equal(hits, stored)
    assert stats["hits"] == 3 and stats["computed"] == 0
    assert not [w for w in caught if issubclass(w.category, EmbeddingCacheWarning)]
    assert _snapshot(directory) == before
