"""A full disk is a fault, never a mistake (issue 30): a call returns its vectors with a
warning in a fresh process too, the CLI writes its output, and a prune frees room on it.

The disk is real: a tmpfs of `DISK_BYTES` mounted for each test (the tests run as root here and
in CI; skipped where mounting is not allowed), filled by the cache itself, as a long job fills
a disk, and always unmounted afterwards. "Fresh" means a new `EmbeddingCache`, whose store never
worked in this process, as in a new process or a CLI run.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embeddingcache import EmbeddingCache, EmbeddingCacheWarning, StorageError
from embeddingcache.cli import main
from embeddingcache.keys import key_of

DISK_BYTES = 8 << 20
FILL = 8000  # texts: more than the disk holds with the 256-d static model (about 4,100 fit)
FULL = "database or disk is full"


def mount_tmpfs(target: Path, options: str) -> None:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """An empty tmpfs of `DISK_BYTES`, unmounted afterwards even when the test fails."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mount_tmpfs(mount, f"size={DISK_BYTES}")
    try:
        yield mount
    finally:
        # Lazy: a cache the failed test left open must not keep the mount (nor fail teardown).
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.fixture
def full_disk(disk: Path, static_model: str) -> tuple[Path, list[str]]:
    """The disk, filled by a cache storing more texts than it holds; the texts it stored."""
    texts = [f"filling text number {i}" for i in range(FILL)]
    with EmbeddingCache(static_model, cache_dir=disk, device="cpu") as cache:
        with pytest.warns(EmbeddingCacheWarning, match=FULL):
            cache.get_embeddings(texts)
    assert shutil.disk_usage(disk).free < 64 << 10
    keys = stored_keys(disk)
    return disk, [t for t in texts if key_of(t) in keys]


def stored_keys(folder: Path) -> set[bytes]:
    """The keys of the vectors stored in the folder's shard files, read with sqlite3."""
    keys: set[bytes] = set()
    for file in folder.glob("*.db"):
        if file.name != "hashstring.db":
            with contextlib.closing(sqlite3.connect(file)) as db:
                keys.update(row[0] for row in db.execute("SELECT hashid FROM embedding"))
    return keys


def encoded(model: str, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return np.asarray(SentenceTransformer(model, device="cpu").encode(texts))


def test_a_fresh_cache_on_a_disk_the_cache_filled_returns_every_vector_with_a_warning(
    static_model: str, full_disk: tuple[Path, list[str]]
) -> None:
    """A cache that never worked here, on a full disk: its first call, all misses, returns
    them computed with a warning (not `StorageError`), counted as not stored; hits are served."""
    folder, stored = full_disk
    assert len(stored) > 1000
    new = [f"never stored {i}" for i in range(300)]
    with EmbeddingCache(static_model, cache_dir=folder, device="cpu") as cache:
        with pytest.warns(EmbeddingCacheWarning, match=rf"could not store 300 vector.*{FULL}"):
            vectors = cache.get_embeddings(new)
        assert cache.stats["not_stored"] == 300
        np.testing.assert_allclose(vectors, encoded(static_model, new), atol=1e-6)
        hits = cache.get_embeddings(stored[:200])
        assert (cache.stats["hits"], cache.stats["computed"]) == (200, 300)
    np.testing.assert_allclose(hits, encoded(static_model, stored[:200]), atol=1e-6)


def test_a_fresh_cache_on_a_disk_out_of_inodes_returns_its_vectors_with_a_warning(
    static_model: str, tmp_path: Path
) -> None:
    """No file can be created (ENOSPC: SQLite says only "unable to open database file", and
    creating the directory fails with errno 28): a fault, so the call degrades."""
    mount = tmp_path / "inodes"
    mount.mkdir()
    mount_tmpfs(mount, "size=1m,nr_inodes=3")
    try:
        (mount / "cache").mkdir()
        (mount / "the last inode").touch()
        texts = ["first text", "second text"]
        for folder, reason in ((mount / "cache", "open database"), (mount / "new", "Errno 28")):
            with EmbeddingCache(static_model, cache_dir=folder, device="cpu") as cache:
                with pytest.warns(EmbeddingCacheWarning, match=f"could not store 2 .*{reason}"):
                    vectors = cache.get_embeddings(texts)
            np.testing.assert_allclose(vectors, encoded(static_model, texts), atol=1e-6)
        assert sorted(p.name for p in mount.iterdir()) == ["cache", "the last inode"]
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_cache_directory_that_cannot_exist_is_still_one_clear_error(
    static_model: str, tmp_path: Path
) -> None:
    """A mistake, not a fault: a file where the cache directory should be raises
    `StorageError` in a fresh cache, as storage that never worked always did."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with EmbeddingCache(static_model, cache_dir=blocker / "cache", device="cpu") as cache:
        with pytest.raises(StorageError, match=r"cannot create the cache directory .*Not a dir"):
            cache.get_embeddings(["never stored"])


def test_the_cli_on_a_full_disk_writes_its_output_and_says_what_it_could_not_store(
    static_model: str, full_disk: tuple[Path, list[str]], tmp_path: Path, capsys: Any
) -> None:
    """`embeddingcache embed` on a full cache disk exits 0, writes every vector to its output
    file, and says how many it could not store, and why, once. Its first chunk (512 lines)
    is all new: no hit has shown the store working before the first write fails."""
    folder, stored = full_disk
    texts = [f"a line never stored {i}" for i in range(600)] + stored[:100]
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "vectors.npy"
    model = ["--model", static_model, "--device", "cpu", "--cache-dir", str(folder)]
    assert main(["embed", *model, "--out", str(out), str(lines)]) == 0
    np.testing.assert_allclose(np.load(out), encoded(static_model, texts), atol=1e-6)
    captured = capsys.readouterr()
    assert "100 from the cache, 0 from the backend, 600 computed" in captured.out
    assert "600 not stored in the cache" in captured.out
    said = [line for line in captured.err.splitlines() if line.startswith("embeddingcache: w")]
    assert said and all(FULL in line for line in said)
    assert len(said) == len(set(said))


def test_prune_on_a_full_disk_frees_room_and_the_next_call_stores_again(
    static_model: str, full_disk: tuple[Path, list[str]]
) -> None:
    """`EmbeddingCache.prune(max_size=...)` in a fresh cache on the full disk frees room (the
    whole shard goes: SQLite has no room to delete a row), and the next call stores."""
    folder, stored = full_disk
    budget = DISK_BYTES // 2
    with EmbeddingCache(static_model, cache_dir=folder, device="cpu") as cache:
        report = cache.prune(max_size=budget)
        assert report.bytes_after <= budget
        assert report.vectors_removed == len(stored)
        assert shutil.disk_usage(folder).free > DISK_BYTES - (256 << 10)
        texts = [f"stored after the prune {i}" for i in range(500)]
        with warnings.catch_warnings():
            warnings.simplefilter("error", EmbeddingCacheWarning)
            cache.get_embeddings(texts)
        assert cache.missing(texts) == []
    assert len(stored_keys(folder)) == len(texts)


def test_the_cli_prunes_a_full_disk(full_disk: tuple[Path, list[str]], capsys: Any) -> None:
    """`embeddingcache prune --max-size` runs on the full disk, exits 0 and frees room."""
    folder, stored = full_disk
    assert main(["prune", "--cache-dir", str(folder), "--max-size", "4MiB"]) == 0
    assert f"removed {len(stored)} vectors" in capsys.readouterr().out
    assert shutil.disk_usage(folder).free > DISK_BYTES // 2


@pytest.mark.parametrize(
    ("errcode", "degrades"), [("disk_full", True), ("insufficient_privilege", False)]
)
def test_postgres_disk_full_degrades_in_a_fresh_cache_and_a_refusal_does_not(
    static_model: str, pg_url: str, errcode: str, degrades: bool
) -> None:
    """The server raises SQLSTATE 53100 (disk_full) at every INSERT of a cache that never
    worked: vectors with a warning. Raised as 42501 (a refused write, a mistake): one
    `StorageError`, as before."""
    from sqlalchemy import event

    fault = f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{errcode}'; END $$"

    def refuse(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            cursor.execute(fault)

    texts = ["first text", "second text"]
    with EmbeddingCache(static_model, db_url=pg_url, device="cpu") as cache:
        layout = cache._store.layout
        engines = {p.engine for p in (layout.text_place(), layout.shard_place(cache.model))}
        for engine in engines:
            event.listen(engine, "before_cursor_execute", refuse)
        if not degrades:
            with pytest.raises(StorageError, match="injected"):
                cache.get_embeddings(texts)
            return
        with pytest.warns(EmbeddingCacheWarning, match="could not store 2 .*injected"):
            vectors = cache.get_embeddings(texts)
    np.testing.assert_allclose(vectors, encoded(static_model, texts), atol=1e-6)
