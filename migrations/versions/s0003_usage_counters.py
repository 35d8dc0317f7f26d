"""model_info.hits and model_info.misses: lookups counted across runs, for `stats`.

Revision ID: s0003
Revises: s0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "s0003"
down_revision = "s0002"
branch_labels = None
depends_on = None


def schema() -> str | None:
    """The place's schema (None for a SQLite file), handed over by the library."""
    return context.config.attributes.get("schema")  # type: ignore[no-any-return]


def upgrade() -> None:
    for name in ("hits", "misses"):
        op.add_column(
            "model_info",
            sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"),
            schema=schema(),
        )


def downgrade() -> None:
    with op.batch_alter_table("model_info", schema=schema()) as batch:
        batch.drop_column("misses")
        batch.drop_column("hits")
