"""One owner of the SQL against the cache's tables: ``storage/tables.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import embeddingcache

PACKAGE = Path(embeddingcache.__file__).parent
OWNER = "storage/tables.py"
# Statements other modules may build: the schema's own bookkeeping, not a shard's rows.
ALLOWED = {
    "storage/layout.py": {"select", "func"},  # pg_total_relation_size, for a shard's bytes
    "storage/migrate.py": {"select", "text"},  # alembic_version, and an advisory lock
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
