"""Alembic migrations of embeddingcache, installed as ``embeddingcache.migrations``.

Two branches: ``text`` for the place that holds ``hashstring``, ``shard`` for each model shard.
Every place (a SQLite file, or a schema of a server database) has its own ``alembic_version``
table and is upgraded on its own; see ``embeddingcache/storage/migrate.py``.
"""
