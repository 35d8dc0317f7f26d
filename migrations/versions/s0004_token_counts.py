"""embedding.tokens and embedding.tokens_exact: what each computed vector cost, in tokens;
model_info.tokens_saved: the tokens of the hits served instead of paid for again, and
model_info.counts_tokens: whether the shard holds counts at all (issue 16).

Vectors stored before this revision keep NULL counts: what they cost is not known, and is
never guessed after the fact.

Revision ID: s0004
Revises: s0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "s0004"
down_revision = "s0003"
branch_labels = None
depends_on = None


def schema() -> str | None:
    """The place's schema (None for a SQLite file), handed over by the library."""
    return context.config.attributes.get("schema")  # type: ignore[no-any-return]


def upgrade() -> None:
    # Nullable columns without a default: no table rewrite on SQLite or Postgres.
    op.add_column("embedding", sa.Column("tokens", sa.Integer(), nullable=True), schema=schema())
    op.add_column(
        "embedding", sa.Column("tokens_exact", sa.Boolean(), nullable=True), schema=schema()
    )
    op.add_column(
        "model_info",
        sa.Column("tokens_saved", sa.BigInteger(), nullable=False, server_default="0"),
        schema=schema(),
    )
    op.add_column(
        "model_info",
        sa.Column("counts_tokens", sa.Boolean(), nullable=False, server_default=sa.false()),
        schema=schema(),
    )


def downgrade() -> None:
    with op.batch_alter_table("model_info", schema=schema()) as batch:
        batch.drop_column("counts_tokens")
        batch.drop_column("tokens_saved")
    with op.batch_alter_table("embedding", schema=schema()) as batch:
        batch.drop_column("tokens_exact")
        batch.drop_column("tokens")
