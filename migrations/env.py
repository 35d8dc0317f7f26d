"""Alembic environment: runs on the connection (inside the transaction) that the library hands
over through ``config.attributes``; never opens one of its own."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
schema = context.config.attributes.get("schema")

context.configure(
    connection=connection,
    version_table_schema=schema,
    # SQLite cannot ALTER most things in place; batch mode copies the table when needed.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
