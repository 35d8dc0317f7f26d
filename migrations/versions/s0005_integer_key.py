"""SQLite shards: embedding keyed by ``id``, the digest's first 8 bytes as a signed 64-bit
integer (an INTEGER PRIMARY KEY, the rowid), the full ``hashid`` kept beside it, and
``embedding_overflow`` for a key whose id another key holds (issue 18: one B-tree descent per
hit instead of two). Postgres keeps its layout: nothing to do there.

The rows are copied in id order (sorting ids and rowids only, not the vectors), so the new
table is written front to back; the old table's pages become free pages that later writes
reuse (``embeddingcache prune`` compacts the file).

Revision ID: s0005
Revises: s0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "s0005"
down_revision = "s0004"
branch_labels = None
depends_on = None

VECTOR_COLUMNS = "vector, created_at, last_used, tokens, tokens_exact"


def schema() -> str | None:
    """The place's schema (None for a SQLite file), handed over by the library."""
    return context.config.attributes.get("schema")  # type: ignore[no-any-return]


def _key_id(key: bytes) -> int:
    # The library's storage.tables.key_ids, frozen here as this revision defines it.
    return int.from_bytes(bytes(key[:8]).ljust(8, b"\0"), "big", signed=True)


def _vector_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("last_used", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=True),
        sa.Column("tokens_exact", sa.Boolean(), nullable=True),
    ]


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    if not _sqlite():
        return
    bind = op.get_bind()
    raw = bind.connection.driver_connection
    raw.create_function("ec_key_id", 1, _key_id, deterministic=True)  # type: ignore[union-attr]
    op.create_table(
        "embedding_new",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("hashid", sa.LargeBinary(64), nullable=False),
        *_vector_columns(),
    )
    op.create_table(
        "embedding_overflow",
        sa.Column("hashid", sa.LargeBinary(64), primary_key=True),
        *_vector_columns(),
    )
    op.execute(
        "CREATE TEMP TABLE ec_order AS "
        "SELECT ec_key_id(hashid) AS id, rowid AS r FROM embedding ORDER BY 1, hashid"
    )
    # The first key of each id takes it (keys in order), the others go to the overflow.
    op.execute(
        f"INSERT OR IGNORE INTO embedding_new (id, hashid, {VECTOR_COLUMNS}) "
        f"SELECT o.id, e.hashid, {', '.join('e.' + c for c in VECTOR_COLUMNS.split(', '))} "
        "FROM ec_order AS o CROSS JOIN embedding AS e ON e.rowid = o.r ORDER BY o.rowid"
    )
    op.execute(
        f"INSERT INTO embedding_overflow (hashid, {VECTOR_COLUMNS}) "
        f"SELECT hashid, {VECTOR_COLUMNS} FROM embedding AS e WHERE NOT EXISTS ("
        "SELECT 1 FROM embedding_new AS n WHERE n.id = ec_key_id(e.hashid) "
        "AND n.hashid = e.hashid)"
    )
    op.execute("DROP TABLE ec_order")
    op.drop_table("embedding")
    op.rename_table("embedding_new", "embedding")


def downgrade() -> None:
    if not _sqlite():
        return
    op.create_table(
        "embedding_old",
        sa.Column("hashid", sa.LargeBinary(64), primary_key=True),
        *_vector_columns(),
    )
    for source in ("embedding", "embedding_overflow"):
        op.execute(
            f"INSERT OR IGNORE INTO embedding_old (hashid, {VECTOR_COLUMNS}) "
            f"SELECT hashid, {VECTOR_COLUMNS} FROM {source}"
        )
    op.drop_table("embedding_overflow")
    op.drop_table("embedding")
    op.rename_table("embedding_old", "embedding")
