"""Schema migrations: new places at head, old ones upgraded in place, data kept."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from embeddingcache import EmbeddingCache
from embeddingcache.cli import main
from embeddingcache.keys import key_of
from embeddingcache.storage import Store, layout_for, migrate

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_V1 = Path(__file__).parent / "data" / "schema-v1"  # written by embeddingcache 0.1.0
LEGACY_TEXTS = [f"legacy text {i}" for i in range(5)]
LEGACY_VECTORS = (np.arange(5 * 8, dtype=np.float32).reshape(5, 8) / 7).astype(np.float32)


def test_the_known_heads_are_the_scripts_heads() -> None:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(migrate.script_location())
    heads = {
        scripts.get_revision(h).branch_labels.pop()
        if scripts.get_revision(h).branch_labels
        else _branch_of(scripts, h): h
        for h in scripts.get_heads()
    }
    assert heads == migrate.HEADS


def _indexes(db: sqlite3.Connection) -> list[tuple[str]]:
    """The indexes SQLite keeps on a shard's ``embedding``, by name."""
    sql = "SELECT name FROM sqlite_master WHERE tbl_name = 'embedding' AND type = 'index'"
    return db.execute(sql).fetchall()


def _legacy_shard(connection: Any, upgrade_to: Any, revision: str) -> None:
    """A SQLite shard of ``revision`` (s0004 on), its model row written as the release that
    made it would have; the test adds the vectors."""
    upgrade_to(connection, None, revision)
    connection.execute(
        text(
            "INSERT INTO model_info VALUES "
            "(1, 'legacy-model', 8, 'float32', '0.1.0', 0, NULL, 0, 0, 0, 0)"
        )
    )


def _branch_of(scripts: Any, revision: str) -> str:
    for rev in scripts.iterate_revisions(revision, "base"):
        if rev.branch_labels:
            return str(next(iter(rev.branch_labels)))
    raise AssertionError(revision)


def test_a_new_cache_is_created_at_head(file_cache: EmbeddingCache, cache_dir: Path) -> None:
    file_cache.get_embeddings(["x"])
    for name, kind in (
        ("hashstring.db", "text"),
        (next(p.name for p in cache_dir.glob("*.db") if p.name != "hashstring.db"), "shard"),
    ):
        with sqlite3.connect(cache_dir / name) as db:
            assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
                (migrate.HEADS[kind],)
            ]


def test_a_cache_of_the_first_schema_is_upgraded_in_place_with_its_data(tmp_path: Path) -> None:
    old = tmp_path / "old-cache"
    shutil.copytree(SCHEMA_V1, old)
    with sqlite3.connect(old / "legacy-model.db") as db:
        assert not db.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'"
        ).fetchall()
    store = Store(layout_for(old, None))
    found = store.lookup("legacy-model", [key_of(t) for t in LEGACY_TEXTS])
    assert sorted(found.positions) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(found.vectors, LEGACY_VECTORS[found.positions])
    assert store.text_count() == 5
    store.close()
    with sqlite3.connect(old / "legacy-model.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (migrate.HEADS["shard"],)
        ]
        columns = [row[1] for row in db.execute("PRAGMA table_info(model_info)")]
        assert columns[-5:] == ["revision", "hits", "misses", "tokens_saved", "counts_tokens"]
        columns = [row[1] for row in db.execute("PRAGMA table_info(embedding)")]
        assert columns[:2] == ["id", "hashid"]
        assert columns[-2:] == ["tokens", "tokens_exact"]
        assert db.execute("SELECT count(*) FROM embedding WHERE tokens IS NULL").fetchall() == [
            (5,)
        ]
        assert db.execute("SELECT model, dimension, revision FROM model_info").fetchall() == [
            ("legacy-model", 8, None)
        ]
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_the_migrate_command_upgrades_ahead_of_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old-cache"
    shutil.copytree(SCHEMA_V1, old)
    assert main(["migrate", "--cache-dir", str(old)]) == 0
    assert "hashstring.db, legacy-model.db at the current schema" in capsys.readouterr().out
    with sqlite3.connect(old / "hashstring.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("t0001",)]


def test_an_older_postgres_schema_is_upgraded_in_place(pg_url: str, upgrade_to: Any) -> None:
    layout = layout_for(Path("unused"), pg_url)
    place = layout.shard_place("legacy-model")
    with place.engine.begin() as connection:
        upgrade_to(connection, place.schema, "s0001")
        connection.execute(
            text(
                f'INSERT INTO "{place.schema}".model_info VALUES '
                "(1, 'legacy-model', 8, 'float32', '0.1.0', 0)"
            )
        )
        connection.execute(
            text(f'INSERT INTO "{place.schema}".embedding VALUES (:k, :v, 0, 0)'),
            [
                {"k": key_of(t), "v": v.tobytes()}
                for t, v in zip(LEGACY_TEXTS, LEGACY_VECTORS, strict=True)
            ],
        )
    layout.close()
    store = Store(layout_for(Path("unused"), pg_url))
    found = store.lookup("legacy-model", [key_of(t) for t in LEGACY_TEXTS])
    assert sorted(found.positions) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(found.vectors, LEGACY_VECTORS[found.positions])
    store.close()
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as connection:
        assert "revision" in {
            c["name"] for c in inspect(connection).get_columns("model_info", schema=place.schema)
        }
        version = connection.scalar(
            text(f'SELECT version_num FROM "{place.schema}".alembic_version')
        )
    engine.dispose()
    assert version == migrate.HEADS["shard"]


OPENER = """
import json, sys, time
from pathlib import Path
from embeddingcache.storage import Store, layout_for
from embeddingcache.keys import key_of
import numpy as np
storage, flag, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while not Path(flag).exists():
    time.sleep(0.005)
store = Store(layout_for(Path(storage.get("cache_dir", "unused")), storage.get("db_url")))
texts = [f"opened by {n}", "opened by all"]
store.put("fresh-model", [key_of(t) for t in texts], texts, np.ones((2, 4), np.float32))
store.close()
"""


def test_several_processes_opening_one_new_cache_at_once_all_succeed(
    storage: dict[str, Any], tmp_path: Path
) -> None:
    flag = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, json.dumps(storage, default=str), str(flag), str(n)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(6)
    ]
    flag.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    store = Store(layout_for(Path(storage.get("cache_dir", "unused")), storage.get("db_url")))
    assert store.text_count() == 7
    assert [s.entries for s in store.summaries()] == [7]
    store.close()


def test_the_wheel_ships_the_migrations(tmp_path: Path) -> None:
    """Build the wheel, install it alone in a fresh environment, open a cache with it."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("embeddingcache-*.whl"))
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The dependencies come from this environment's site-packages, added after the fresh one's.
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    (site / "zz-deps.pth").write_text(f"{deps}\n")
    code = (
        "import sys, sqlite3, embeddingcache.migrations as m;"
        "from pathlib import Path;"
        "from embeddingcache.storage import Store, layout_for;"
        "from embeddingcache.keys import key_of;"
        "import numpy as np;"
        "s = Store(layout_for(Path(sys.argv[1]), None));"
        "s.put('m', [key_of('t')], ['t'], np.ones((1, 3), np.float32));"
        "print(m.__file__)"
    )
    cache = tmp_path / "cache"
    result = subprocess.run(
        [str(python), "-I", "-c", code, str(cache)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(site))
    with sqlite3.connect(cache / "m.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (migrate.HEADS["shard"],)
        ]


def test_a_shard_of_schema_s0004_is_rekeyed_in_place_with_every_vector_and_a_collision_kept(
    tmp_path: Path, upgrade_to: Any
) -> None:
    """s0005 and s0006 on a file: every row found by its digest's 8-byte prefix, a key whose prefix
    another holds in the overflow, every vector served equal; Postgres is left as it was."""
    rng = np.random.default_rng(5)
    keys = [key_of(f"stored at s0004 {i}") for i in range(300)]
    twin = keys[17][:8] + bytes(56)  # a key with another's prefix: the overflow takes one
    keys.append(twin)
    vectors = rng.standard_normal((len(keys), 8)).astype(np.float32)
    path = tmp_path / "legacy-model.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        _legacy_shard(connection, upgrade_to, "s0004")
        connection.execute(
            text("INSERT INTO embedding VALUES (:k, :v, 1, 2, :t, 1)"),
            [
                {"k": k, "v": v.tobytes(), "t": i}
                for i, (k, v) in enumerate(zip(keys, vectors, strict=True))
            ],
        )
    engine.dispose()
    store = Store(layout_for(tmp_path, None))
    found = store.lookup("legacy-model", keys)
    assert sorted(found.positions) == list(range(len(keys)))
    np.testing.assert_array_equal(found.vectors, vectors[found.positions])
    one = store.lookup("legacy-model", [twin])
    assert one.vectors.tobytes() == vectors[-1].tobytes()
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (migrate.HEADS["shard"],)
        ]
        rows = db.execute("SELECT id, hashid, rowid, tokens, created_at FROM embedding").fetchall()
        overflow = db.execute("SELECT hashid, tokens FROM embedding_overflow").fetchall()
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert _indexes(db) == [("embedding_id",)]
    assert len(rows) == len(keys) - 1 and len(overflow) == 1
    assert all(i == int.from_bytes(k[:8], "big", signed=True) for i, k, _, _, _ in rows)
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)  # copied in id order
    # The smaller key of the two keeps the id; the rows keep every column.
    assert overflow == [(max(keys[17], twin), keys.index(max(keys[17], twin)))]
    assert {bytes(k): t for _, k, _, t, _ in rows} == {
        k: i for i, k in enumerate(keys) if k != overflow[0][0]
    }
    assert {c for *_, c in rows} == {1}


def test_s0005_goes_back_down_to_one_table_keyed_by_the_digest(
    tmp_path: Path, downgrade_to: Any
) -> None:
    path = tmp_path / "m.db"
    store = Store(layout_for(tmp_path, None))
    keys = [key_of("a"), key_of("b")]
    store.put("m", keys, ["a", "b"], np.ones((2, 3), np.float32))
    store.close()
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO embedding_overflow SELECT :k, vector, created_at, last_used, "
                "tokens, tokens_exact FROM embedding LIMIT 1"
            ),
            {"k": keys[0][:8] + bytes(56)},
        )
        downgrade_to(connection, "s0004")
    with engine.connect() as connection:
        assert next(c["name"] for c in inspect(connection).get_columns("embedding")) == "hashid"
        assert connection.scalar(text("SELECT count(*) FROM embedding")) == 3
    engine.dispose()


def test_a_shard_of_schema_s0005_gets_its_rows_appended_behind_an_index_and_goes_back_down(
    tmp_path: Path, upgrade_to: Any, downgrade_to: Any
) -> None:
    """s0006 on a shard of s0005 (the schema before it): every row and column kept, the
    overflow's too, ``id`` no longer the rowid but behind the unique index ``embedding_id``
    that the hit query uses; downgrading makes ``id`` the rowid again, rows kept."""
    rng = np.random.default_rng(6)
    keys = [key_of(f"stored at s0005 {i}") for i in range(200)]
    vectors = rng.standard_normal((len(keys), 8)).astype(np.float32)
    twin = keys[3][:8] + bytes(56)
    path = tmp_path / "legacy-model.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        _legacy_shard(connection, upgrade_to, "s0005")
        connection.execute(
            text("INSERT INTO embedding VALUES (:i, :k, :v, 1, 2, :t, 1)"),
            [
                {"i": int.from_bytes(k[:8], "big", signed=True), "k": k, "v": v.tobytes(), "t": n}
                for n, (k, v) in enumerate(zip(keys, vectors, strict=True))
            ],
        )
        connection.execute(
            text("INSERT INTO embedding_overflow VALUES (:k, :v, 1, 2, 7, 0)"),
            {"k": twin, "v": vectors[0].tobytes()},
        )
    engine.dispose()
    store = Store(layout_for(tmp_path, None))
    found = store.lookup("legacy-model", [*keys, twin])
    assert sorted(found.positions) == list(range(len(keys) + 1))
    np.testing.assert_array_equal(found.vectors, np.vstack([vectors, vectors[:1]])[found.positions])
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("s0007",)]
        assert _indexes(db) == [("embedding_id",)]
        rows = db.execute("SELECT id, hashid, rowid, tokens FROM embedding ORDER BY id").fetchall()
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT vector FROM embedding WHERE id IN (?, ?)", (1, 2)
        )
        assert "USING INDEX embedding_id" in " ".join(str(row[-1]) for row in plan)
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with pytest.raises(sqlite3.IntegrityError, match=r"embedding\.id"):
            db.execute("INSERT INTO embedding SELECT * FROM embedding LIMIT 1")
    assert [bytes(k) for _, k, _, _ in rows] == sorted(
        keys, key=lambda k: int.from_bytes(k[:8], "big", signed=True)
    )
    assert [r for _, _, r, _ in rows] == list(range(1, len(keys) + 1))  # copied in id order
    assert {bytes(k): t for _, k, _, t in rows} == {k: n for n, k in enumerate(keys)}
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        downgrade_to(connection, "s0005")
    engine.dispose()
    with sqlite3.connect(path) as db:
        assert _indexes(db) == []
        back = db.execute("SELECT id, hashid, rowid, tokens FROM embedding ORDER BY id").fetchall()
        assert db.execute("SELECT count(*) FROM embedding_overflow").fetchall() == [(1,)]
    assert [(i, k, t) for i, k, _, t in back] == [(i, k, t) for i, k, _, t in rows]
    assert all(i == r for i, _, r, _ in back)
