"""``claim``: the texts being computed, and by whom, so that every process sharing a store
computes each text once (issue 28). One row per claim: its owner (a random 63-bit number),
when its lease ends, whether its holder let it go, and the claimed texts' 8-byte ids.

Revision ID: s0007
Revises: s0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "s0007"
down_revision = "s0006"
branch_labels = None
depends_on = None


def schema() -> str | None:
    """The place's schema (None for a SQLite file), handed over by the library."""
    return context.config.attributes.get("schema")  # type: ignore[no-any-return]


def upgrade() -> None:
    op.create_table(
        "claim",
        sa.Column("owner", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.Column("keys", sa.LargeBinary(), nullable=False),
        schema=schema(),
    )


def downgrade() -> None:
    op.drop_table("claim", schema=schema())
