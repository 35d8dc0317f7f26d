"""A place: an engine and the tables it holds for one job (the texts, or one model's shard).

A leaf of the storage package: ``layout.py`` decides where places are, and ``tables.py``,
``migrate.py`` and the store work on them, so the types live apart from all of those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, MetaData, Table

from .schema import (
    OVERFLOW,
    claim_table,
    embedding_table,
    hashstring_table,
    model_info_table,
    sqlite_embedding_table,
)

__all__ = ["Place", "ShardPlace", "TextPlace"]


@dataclass(frozen=True)
class Place:
    """An engine, and the schema and tables it holds for one job."""

    engine: Engine
    metadata: MetaData
    schema: str | None
    path: Path | None  # the SQLite file, when there is one
    name: str  # for messages and for stats


@dataclass(frozen=True)
class TextPlace(Place):
    hashstring: Table

    @classmethod
    def make(cls, engine: Engine, schema: str | None, path: Path | None, name: str) -> TextPlace:
        metadata = MetaData(schema=schema)
        return cls(engine, metadata, schema, path, name, hashstring_table(metadata))


@dataclass(frozen=True)
class ShardPlace(Place):
    embedding: Table
    model_info: Table
    # Texts being computed, and by whom (see storage/claims.py).
    claim: Table
    # SQLite: the keys whose 8-byte id another key holds in ``embedding`` (see schema.py).
    overflow: Table | None = None

    @classmethod
    def make(cls, engine: Engine, schema: str | None, path: Path | None, name: str) -> ShardPlace:
        """A server database's shard is keyed by the digest; a SQLite file's by its 8-byte
        prefix, with the overflow beside it (see schema.py)."""
        metadata = MetaData(schema=schema)
        server = path is None
        embedding = embedding_table(metadata) if server else sqlite_embedding_table(metadata)
        info = model_info_table(metadata)
        overflow = None if server else embedding_table(metadata, OVERFLOW)
        claim = claim_table(metadata)
        return cls(engine, metadata, schema, path, name, embedding, info, claim, overflow)
