"""One owner of the SQL against the cache's tables: ``storage/tables.py``."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np

import embeddingcache

PACKAGE = Path(embeddingcache.__file__).parent
OWNER = "storage/tables.py"
# Statements other modules may build: the schema's own bookkeeping, not a shard's rows.
ALLOWED = {
    "storage/layout.py": {"select", "func"},  # pg_total_relation_size, for a shard's bytes
    "storage/migrate.py": {"select", "text"},  # alembic_version, and an advisory lock
    # The claim table's own SQL (issue 28): who computes which texts, never a shard's rows.
    "storage/claims.py": {"select", "insert", "update", "delete"},
}
STATEMENTS = {"select", "insert", "update", "delete", "bindparam", "text", "func"}
TABLES = {"embedding", "hashstring", "model_info"}


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8")))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def test_only_the_table_module_builds_statements_against_the_tables() -> None:
    built = {}
    for name, tree in _modules():
        if name == OWNER:
            continue
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy")
            for alias in node.names
        }
        extra = (imported & STATEMENTS) - ALLOWED.get(name, set())
        if extra:
            built[name] = sorted(extra)
    assert built == {}


def test_only_the_table_module_and_the_layout_reach_a_table_object() -> None:
    reached = {}
    for name, tree in _modules():
        if name in (OWNER, "storage/layout.py", "storage/tables.py"):
            continue
        found = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in TABLES
        }
        if found:
            reached[name] = sorted(found)
    assert reached == {}


def test_no_module_outside_storage_speaks_to_a_database() -> None:
    for name, tree in _modules():
        if name.startswith("storage/"):
            continue
        roots = {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
        } | {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        assert not roots & {"sqlalchemy", "sqlite3", "psycopg"}, name


def test_each_backend_has_its_own_tables_and_put_new_reports_the_rows_it_kept(
    any_store: Any, storage: dict[str, Any]
) -> None:
    from embeddingcache.keys import key_of
    from embeddingcache.storage import tables
    from embeddingcache.storage.sqlite import write_transaction

    store = any_store
    store.put("m", [key_of("a")], ["a"], np.ones((1, 3), np.float32))
    place = store.layout.shard_place("m")
    table = tables.shard_table(place)
    texts = tables.text_table(store.layout.text_place())
    sqlite = "cache_dir" in storage
    assert isinstance(table, tables.SQLiteShardTable if sqlite else tables.PostgresShardTable)
    assert isinstance(texts, tables.SQLiteTextTable if sqlite else tables.PostgresTextTable)
    new = {"vector": np.zeros(3, np.float32).tobytes(), "created_at": 1, "last_used": 1}
    rows = [{"hashid": key_of(t), **new} for t in ("a", "b", "c")]
    with write_transaction(place.engine) as connection:
        assert table.put_new(connection, rows) == 1  # "a" was stored: kept as it was
    with write_transaction(place.engine) as connection:
        assert table.put_new(connection, rows) == 3
    with place.engine.connect() as connection:
        stored = {bytes(k): v for k, v, *_ in table.get(connection, [key_of("a"), key_of("b")])}
        assert stored[key_of("a")] == np.ones(3, np.float32).tobytes()
        assert [k for k, _ in table.after(connection, b"", 10)] == sorted(stored | {key_of("c"): 0})
        assert next(k for _, _, k in table.by_use(connection)) in (key_of("b"), key_of("c"))
    with write_transaction(place.engine) as connection:
        table.delete(connection, [key_of("b")])
    with place.engine.connect() as connection:
        assert table.count(connection) == 2
    text_rows = [{"hashid": key_of(t), "text": t} for t in ("a", "b")]
    with write_transaction(store.layout.text_place().engine) as connection:
        assert texts.put_new(connection, text_rows) == 1
    with write_transaction(store.layout.text_place().engine) as connection:
        before = texts.removals(connection)
        texts.delete(connection, [key_of("b")])
        after = texts.removals(connection)
    # A writer learns that a prune may have taken texts: SQLite counts each delete of texts;
    # Postgres counts the prunes that are about to (`removing`, in a sequence).
    assert before is not None
    if sqlite:
        assert after == before + 1
    else:
        assert after == before
        with write_transaction(store.layout.text_place().engine) as connection:
            texts.removing(connection)
            assert texts.removals(connection) == before + 1
