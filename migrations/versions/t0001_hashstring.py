"""The hashstring table, as embeddingcache 0.1.0 created it.

Revision ID: t0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "t0001"
down_revision = None
branch_labels = ("text",)
depends_on = None


def schema() -> str | None:
    """The place's schema (None for a SQLite file), handed over by the library."""
    return context.config.attributes.get("schema")  # type: ignore[no-any-return]


def upgrade() -> None:
    op.create_table(
        "hashstring",
        sa.Column("hashid", sa.LargeBinary(64), primary_key=True),
        sa.Column("text", sa.Text(), nullable=False),
        schema=schema(),
    )


def downgrade() -> None:
    op.drop_table("hashstring", schema=schema())
