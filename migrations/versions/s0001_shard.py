"""A model shard, as embeddingcache 0.1.0 created it: embedding and model_info.

Revision ID: s0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "s0001"
down_revision = None
branch_labels = ("shard",)
depends_on = None


def schema() -> str | None:
    """The place's schema (None for a SQLite file), handed over by the library."""
    return context.config.attributes.get("schema")  # type: ignore[no-any-return]


def upgrade() -> None:
    op.create_table(
        "embedding",
        sa.Column("hashid", sa.LargeBinary(64), primary_key=True),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("last_used", sa.Integer(), nullable=False),
        schema=schema(),
    )
    op.create_table(
        "model_info",
        sa.Column("id", sa.Integer(), sa.CheckConstraint("id = 1"), primary_key=True),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.Text(), nullable=False),
        sa.Column("library_version", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        schema=schema(),
    )


def downgrade() -> None:
    op.drop_table("model_info", schema=schema())
    op.drop_table("embedding", schema=schema())
