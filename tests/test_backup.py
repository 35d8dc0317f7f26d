"""Backup and restore of a cache in use (issue 33): to a folder, through a real S3-compatible
server on 127.0.0.1 (moto), and a Postgres cache through pg_dump and pg_restore."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import fresh_database

from embeddingcache import BackupError, EmbeddingCache, InvalidInputError
from embeddingcache.backup import MANIFEST
from embeddingcache.cli import main

ROOT = Path(__file__).resolve().parent.parent
SECRET = "backup-test-secret-Zq8vW3xK"  # the S3 secret key: it must show nowhere
ACCESS_KEY = "AKIABACKUPTEST0001"

WRITER = """
import sys
from pathlib import Path
from embeddingcache import EmbeddingCache
model, cache_dir, name, stop = sys.argv[1:5]
with EmbeddingCache(model, cache_dir=cache_dir, device="cpu", remote_url=False) as cache:
    done = 0
    while not Path(stop).exists():
        cache.get_embeddings([f"{name} writes text {done + i}" for i in range(20)])
        done += 20
"""


def _texts(n: int, tag: str = "stored") -> list[str]:
    return [f"{tag} text number {i}" for i in range(n)]


def _fill(model: str, cache_dir: Path, texts: list[str]) -> np.ndarray:
    with EmbeddingCache(model, cache_dir=cache_dir, device="cpu") as cache:
        return cache.get_embeddings(texts)


def _served(model: str, cache_dir: Path, texts: list[str]) -> np.ndarray:
    """The vectors the cache at ``cache_dir`` holds for ``texts``; none may be computed."""
    with EmbeddingCache(model, cache_dir=cache_dir, device="cpu") as cache:
        vectors = cache.get_embeddings(texts)
        assert cache.stats["computed"] == 0, cache.stats
    return vectors


def _integrity(folder: Path) -> dict[str, str]:
    """``PRAGMA integrity_check`` of every database file in ``folder``, by name."""
    found = {}
    for path in sorted(folder.glob("*.db")):
        with sqlite3.connect(path) as connection:
            found[path.name] = connection.execute("PRAGMA integrity_check").fetchone()[0]
        connection.close()
    return found


def _entries(model: str, cache_dir: Path) -> int:
    with EmbeddingCache(model, cache_dir=cache_dir, device="cpu") as cache:
        return sum(s.entries for s in cache.contents().shards)


# -- a cache in use ------------------------------------------------------------------------


def test_a_backup_taken_while_two_processes_write_restores_every_earlier_vector_bit_for_bit(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """A backup taken while two writer processes add texts restores a sound cache that holds
    every vector stored before it began, the same bytes, and no more than was stored after."""
    texts = _texts(3000)
    expected = _fill(tiny_model, cache_dir, texts)
    stop = tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, tiny_model, str(cache_dir), name, str(stop)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("first", "second")
    ]
    try:
        deadline = time.monotonic() + 120
        while (before := _entries(tiny_model, cache_dir)) < len(texts) + 200:
            assert time.monotonic() < deadline, "the writers stored nothing in 120 s"
            assert all(w.poll() is None for w in writers), "a writer died"
            time.sleep(0.2)
        with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
            report = cache.backup(tmp_path / "backup")
        after = _entries(tiny_model, cache_dir)
        assert all(w.poll() is None for w in writers), "a writer stopped during the backup"
    finally:
        stop.touch()
        for writer in writers:
            _, errors = writer.communicate(timeout=120)
            assert writer.returncode == 0, errors
    restored = tmp_path / "restored"
    with EmbeddingCache(tiny_model, cache_dir=restored, device="cpu") as cache:
        cache.restore(tmp_path / "backup")
    assert set(_integrity(restored).values()) == {"ok"}
    assert before <= _entries(tiny_model, restored) <= after
    assert sum(f.entries for f in report.files if f.model) == _entries(tiny_model, restored)
    vectors = _served(tiny_model, restored, texts)
    assert vectors.tobytes() == expected.tobytes()


def test_a_second_backup_to_the_same_folder_sends_only_the_files_that_changed(
    tiny_model: str, static_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """Files whose copy has the digest of an object already at DEST are not sent again, and
    objects no manifest names any longer are removed."""
    _fill(tiny_model, cache_dir, _texts(50))
    _fill(static_model, cache_dir, _texts(50))
    dest = tmp_path / "backup"
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        first = cache.backup(dest)
        again = cache.backup(dest)
    assert (first.sent, again.sent, again.bytes_sent) == (3, 0, 0)
    _fill(tiny_model, cache_dir, _texts(50, "newer"))  # the tiny shard and the texts change
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        third = cache.backup(dest)
    unchanged = [f for f in third.files if f in first.files]
    assert third.sent == 2 and [f.model for f in unchanged] == [static_model]
    assert sorted(p.name for p in (dest / "files").iterdir()) == sorted(
        f"{f.sha256}.db" for f in third.files
    )


def test_a_backup_that_fails_half_way_leaves_the_previous_one_whole(
    tiny_model: str, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault while the second file is sent (injected) fails the backup; the manifest and
    files of the backup before are untouched, and it restores as it was."""
    from embeddingcache.destinations import Folder

    expected = _fill(tiny_model, cache_dir, _texts(40))
    dest = tmp_path / "backup"
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.backup(dest)
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    _fill(tiny_model, cache_dir, _texts(40, "later"))
    put = Folder.put
    sent: list[str] = []

    def failing(self: Folder, name: str, path: Path, progress: Any) -> None:
        if sent:
            raise BackupError("injected: the disk went away")
        sent.append(name)
        put(self, name, path, progress)

    monkeypatch.setattr(Folder, "put", failing)
    with (
        EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache,
        pytest.raises(BackupError, match="injected"),
    ):
        cache.backup(dest)
    monkeypatch.undo()
    assert sent and {p: p.read_bytes() for p in before} == before
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]
    restored = tmp_path / "restored"
    with EmbeddingCache(tiny_model, cache_dir=restored, device="cpu") as cache:
        cache.restore(dest)
    assert _served(tiny_model, restored, _texts(40)).tobytes() == expected.tobytes()


# -- refused backups -----------------------------------------------------------------------


def _break_truncated(path: Path, manifest: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _break_one_byte(path: Path, manifest: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _break_pages_and_manifest(path: Path, manifest: Path) -> None:
    """Damage the pages, then make the manifest agree with the damaged bytes: only SQLite's
    integrity check can tell."""
    import hashlib

    data = bytearray(path.read_bytes())
    page = 16384
    for start in range(page * 2, len(data) - page, page):  # every b-tree page but the first
        data[start : start + 8] = b"\x0d\xff\xff\xff\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    document = json.loads(manifest.read_text())
    for entry in document["files"]:
        if path.name == f"{entry['sha256']}.db":
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            path.rename(path.with_name(f"{entry['sha256']}.db"))
    manifest.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (_break_truncated, "truncated"),
        (_break_one_byte, "SHA-256"),
        (_break_pages_and_manifest, "integrity check"),
    ],
    ids=["truncated", "a-byte-flipped", "damaged-pages-behind-a-matching-manifest"],
)
def test_a_damaged_backup_is_refused_with_a_clear_error_and_nothing_is_put_in_place(
    tiny_model: str, cache_dir: Path, tmp_path: Path, damage: Any, said: str
) -> None:
    """A shard truncated, a byte changed, or pages damaged behind a manifest that matches:
    the restore says which file and why, and the target folder holds no file afterwards."""
    _fill(tiny_model, cache_dir, _texts(2000))
    dest = tmp_path / "backup"
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        report = cache.backup(dest)
    shard = next(f for f in report.files if f.model is not None)
    damage(dest / shard.object, dest / MANIFEST)
    target = tmp_path / "restored"
    with (
        EmbeddingCache(tiny_model, cache_dir=target, device="cpu") as cache,
        pytest.raises(BackupError, match=said) as caught,
    ):
        cache.restore(dest)
    assert shard.name in str(caught.value) and "nothing was restored" in str(caught.value)
    assert list(target.iterdir()) == []


def test_a_backup_that_lacks_a_file_or_a_manifest_is_refused(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """A missing object, a missing manifest, and a manifest naming a file outside the
    folder are each a BackupError, and nothing is put in place."""
    _fill(tiny_model, cache_dir, _texts(20))
    dest = tmp_path / "backup"
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        report = cache.backup(dest)
    target = tmp_path / "restored"
    (dest / report.files[0].object).unlink()
    with EmbeddingCache(tiny_model, cache_dir=target, device="cpu") as cache:
        with pytest.raises(BackupError, match="lacks"):
            cache.restore(dest)
        document = json.loads((dest / MANIFEST).read_text())
        document["files"][0]["name"] = "../escaped.db"
        (dest / MANIFEST).write_text(json.dumps(document))
        with pytest.raises(BackupError, match="not the name of a cache file"):
            cache.restore(dest)
        (dest / MANIFEST).unlink()
        with pytest.raises(BackupError, match="no backup"):
            cache.restore(dest)
    assert list(target.iterdir()) == [] and not (tmp_path / "escaped.db").exists()


# -- restoring -----------------------------------------------------------------------------


def test_a_restore_refuses_a_folder_that_holds_a_cache_unless_forced(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """Without force the cache in place is kept as it was; with it, the folder holds the
    backup's files and no other."""
    expected = _fill(tiny_model, cache_dir, _texts(30))
    dest = tmp_path / "backup"
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.backup(dest)
    target = tmp_path / "in-use"
    _fill(tiny_model, target, _texts(10, "other"))
    before = {p.name: p.read_bytes() for p in target.glob("*.db")}
    with EmbeddingCache(tiny_model, cache_dir=target, device="cpu") as cache:
        with pytest.raises(BackupError, match="force"):
            cache.restore(dest)
        assert {p.name: p.read_bytes() for p in target.glob("*.db")} == before
        (target / "stray-model.db").write_bytes(b"")  # a shard the backup does not have
        report = cache.restore(dest, force=True)
        assert "stray-model.db" in report.replaced
        # The same open cache serves the restored files at once.
        assert cache.get_embeddings(_texts(30)).tobytes() == expected.tobytes()
        assert cache.stats["computed"] == 0
    assert sorted(p.name for p in target.glob("*.db")) == sorted(f.name for f in report.files)


def test_a_restore_never_reads_a_stale_log_left_in_the_folder_into_a_restored_file(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """A ``hashstring.db-wal`` of another cache, left without its file, is removed before the
    restored file is moved in: SQLite would otherwise read its pages into it."""
    expected = _fill(tiny_model, cache_dir, _texts(30))
    dest = tmp_path / "backup"
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.backup(dest)
    other = tmp_path / "other" / "hashstring.db"
    other.parent.mkdir()
    writer = sqlite3.connect(other, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE hashstring (hashid BLOB PRIMARY KEY, text TEXT)")
    writer.executemany(
        "INSERT INTO hashstring VALUES (?, ?)", [(b"x%d" % i, "y") for i in range(9)]
    )
    target = tmp_path / "restored"
    target.mkdir()
    shutil.copyfile(other.with_name("hashstring.db-wal"), target / "hashstring.db-wal")
    writer.close()
    with EmbeddingCache(tiny_model, cache_dir=target, device="cpu") as cache:
        cache.restore(dest)
        assert cache.contents().texts == 30
    assert set(_integrity(target).values()) == {"ok"}
    assert _served(tiny_model, target, _texts(30)).tobytes() == expected.tobytes()


def test_a_backup_of_an_older_schema_is_upgraded_by_the_usual_migrations(
    tiny_model: str, cache_dir: Path, tmp_path: Path, downgrade_to: Any
) -> None:
    """A shard kept at schema s0005 is restored, brought to the current schema, and serves
    every vector."""
    import hashlib

    from sqlalchemy import create_engine

    expected = _fill(tiny_model, cache_dir, _texts(40))
    dest = tmp_path / "backup"
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        report = cache.backup(dest)
    shard = next(f for f in report.files if f.model is not None)
    engine = create_engine(f"sqlite:///{dest / shard.object}")
    with engine.begin() as connection:
        downgrade_to(connection, "s0005")
    engine.dispose()
    old = dest / shard.object
    data = old.read_bytes()
    document = json.loads((dest / MANIFEST).read_text())
    entry = next(e for e in document["files"] if e["name"] == shard.name)
    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), schema="s0005")
    old.rename(dest / f"files/{entry['sha256']}.db")
    (dest / MANIFEST).write_text(json.dumps(document))
    restored = tmp_path / "restored"
    with EmbeddingCache(tiny_model, cache_dir=restored, device="cpu") as cache:
        report = cache.restore(dest)
    assert report.upgraded == [shard.name]
    assert _served(tiny_model, restored, _texts(40)).tobytes() == expected.tobytes()


def test_the_backup_and_restore_commands_round_trip_and_refuse_to_overwrite(
    tiny_model: str, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`embeddingcache backup DEST` and `restore SRC --cache-dir DIR` say what they did; a
    second restore into the same folder exits 1 without --force, 0 with it."""
    expected = _fill(tiny_model, cache_dir, _texts(25))
    dest = str(tmp_path / "backup")
    assert main(["backup", dest, "--cache-dir", str(cache_dir), "--quiet"]) == 0
    assert "backed up 2 files" in capsys.readouterr().out
    target = tmp_path / "restored"
    assert main(["restore", dest, "--cache-dir", str(target), "-q"]) == 0
    assert "25 texts" in capsys.readouterr().out
    assert main(["restore", dest, "--cache-dir", str(target), "-q"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["restore", dest, "--cache-dir", str(target), "--force", "-q"]) == 0
    assert _served(tiny_model, target, _texts(25)).tobytes() == expected.tobytes()


# -- S3 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 and a free port, in a
    thread of this process, stopped after the module's tests."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A new bucket on that server; boto3 is pointed at it, and only at it, by the
    environment (dummy keys, no profile or config file, no instance metadata)."""
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    name = f"backups-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def test_a_backup_round_trips_through_an_s3_compatible_server(
    tiny_model: str,
    cache_dir: Path,
    tmp_path: Path,
    bucket: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Backed up to s3://bucket/prefix through the CLI, restored into a new folder: every
    vector is served as it was, and neither key shows in any output."""
    caplog.set_level(logging.DEBUG, logger="embeddingcache")
    expected = _fill(tiny_model, cache_dir, _texts(500))
    url = f"s3://{bucket}/nightly/cache"
    assert main(["backup", url, "--cache-dir", str(cache_dir)]) == 0
    restored = tmp_path / "restored"
    assert main(["restore", url, "--cache-dir", str(restored)]) == 0
    assert set(_integrity(restored).values()) == {"ok"}
    assert _served(tiny_model, restored, _texts(500)).tobytes() == expected.tobytes()
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        again = cache.backup(url)
    assert again.sent == 0 and again.destination == url
    shown = capsys.readouterr()
    assert url in shown.out
    for secret in (SECRET, ACCESS_KEY):
        assert secret not in shown.out + shown.err + caplog.text


def test_an_s3_failure_is_a_backup_error_that_shows_no_credential(
    tiny_model: str, cache_dir: Path, bucket: str, s3_endpoint: str
) -> None:
    """A bucket that does not exist, and an object missing from a backup, are BackupErrors
    naming the place; no key is in the message, the repr, or a chained cause."""
    _fill(tiny_model, cache_dir, _texts(5))
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        with pytest.raises(BackupError, match="no-such-bucket") as missing_bucket:
            cache.backup("s3://no-such-bucket-for-this-test/x")
        with pytest.raises(BackupError, match="no backup") as no_backup:
            cache.restore(f"s3://{bucket}/never-written", force=True)
    for caught in (missing_bucket.value, no_backup.value):
        current: BaseException | None = caught
        while current is not None:
            for shown in (str(current), repr(current)):
                assert SECRET not in shown and ACCESS_KEY not in shown
            current = current.__cause__ or current.__context__


# -- Postgres ------------------------------------------------------------------------------


def test_a_backup_of_a_postgres_cache_points_at_pg_dump(tiny_model: str, pg_url: str) -> None:
    """backup and restore refuse a database cache and name the tool that does the job."""
    with EmbeddingCache(tiny_model, db_url=pg_url, device="cpu") as cache:
        with pytest.raises(InvalidInputError, match="pg_dump"):
            cache.backup("/tmp/never-written")
        with pytest.raises(InvalidInputError, match="pg_restore"):
            cache.restore("/tmp/never-read")


def test_a_postgres_cache_dumped_and_restored_into_a_new_database_serves_every_vector(
    tiny_model: str, pg_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """docs/recipes.md's pg_dump and pg_restore lines, run as written against a fresh
    database: every vector is a hit there, the same bytes."""
    from sqlalchemy import make_url

    tools = [shutil.which("pg_dump"), shutil.which("pg_restore")]
    if None in tools:
        pytest.skip("pg_dump and pg_restore are not installed")
    texts = _texts(300)
    with EmbeddingCache(tiny_model, db_url=pg_url, device="cpu") as cache:
        expected = cache.get_embeddings(texts)
    dump = tmp_path / "cache.dump"

    def libpq(url: str) -> str:  # what libpq's tools take: no SQLAlchemy driver name
        return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    subprocess.run(
        ["pg_dump", "--format=custom", f"--file={dump}", libpq(pg_url)], check=True, timeout=120
    )
    with fresh_database(pg_admin_url) as other:
        subprocess.run(
            ["pg_restore", "--no-owner", f"--dbname={libpq(other)}", str(dump)],
            check=True,
            timeout=120,
        )
        with EmbeddingCache(tiny_model, db_url=other, device="cpu") as cache:
            vectors = cache.get_embeddings(texts)
            assert cache.stats["computed"] == 0 and cache.stats["hits"] == len(texts)
    assert vectors.tobytes() == expected.tobytes()
