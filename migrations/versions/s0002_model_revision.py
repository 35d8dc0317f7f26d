"""model_info.revision: the model's revision (a commit hash) when it is known.

Revision ID: s0002
Revises: s0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "s0002"
down_revision = "s0001"
branch_labels = None
depends_on = None


def schema() -> str | None:
    """The place's schema (None for a SQLite file), handed over by the library."""
    return context.config.attributes.get("schema")  # type: ignore[no-any-return]


def upgrade() -> None:
    op.add_column("model_info", sa.Column("revision", sa.Text(), nullable=True), schema=schema())


def downgrade() -> None:
    with op.batch_alter_table("model_info", schema=schema()) as batch:
        batch.drop_column("revision")
