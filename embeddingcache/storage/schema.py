"""The tables, defined once for every backend.

``hashstring`` maps a key to the embedded string it was computed from, so that
``sha512(text) == hashid`` holds for every row (except on Postgres for a text with NUL
characters, which its text type cannot hold: there they read U+FFFD). A model shard holds
``embedding`` (key to float32 little-endian bytes, ``4 * dimension`` long) and
``model_info``, one row naming the model the shard belongs to.

On SQLite a shard's ``embedding`` is found by ``id``, the digest's first 8 bytes as a signed
64-bit integer, through a unique index of its own (``embedding_id``); the rows themselves are
appended in the order they come, under SQLite's rowid. A hit descends the index, small and
dense (16 bytes a key), then the table by rowid (issue 18: at 1M stored, hits ran at 0.66x
of the 10k figure with the 64-byte key, which made the index five times larger). Keying the
rows by ``id`` itself (schema s0005) read 1.2x faster at 1M but wrote 2-3x slower: each
new row then lands on a page of its own, scattered across the file. The full ``hashid`` is
kept, without an index, and compared on every read; a key whose ``id`` another key holds
already goes to ``embedding_overflow``, keyed by ``hashid`` as ``embedding`` is on Postgres.
Two 64-bit prefixes of SHA-512 agree by chance about once in 10^19 pairs, so that table stays
empty unless forced.

A shard's ``claim`` table holds the claims of texts being computed (schema s0007): one row per
claim, its ``keys`` the 8-byte ids of the texts it holds, packed (see
`embeddingcache.storage.claims`).

``hashstring.text`` has no index of its own: ``hashid`` is its digest and already unique, and an
index over texts of any length would cost more than the vectors (and Postgres refuses B-tree
entries over a few kilobytes).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    false,
)

__all__ = [
    "KEY_BYTES",
    "OVERFLOW",
    "claim_table",
    "embedding_table",
    "hashstring_table",
    "model_info_table",
    "sqlite_embedding_table",
]

KEY_BYTES = 64
OVERFLOW = "embedding_overflow"


def hashstring_table(metadata: MetaData, name: str = "hashstring") -> Table:
    return Table(
        name,
        metadata,
        Column("hashid", LargeBinary(KEY_BYTES), primary_key=True),
        Column("text", Text, nullable=False),
    )


def _vector_columns() -> list[Column[Any]]:
    return [
        Column("vector", LargeBinary, nullable=False),
        Column("created_at", Integer, nullable=False),
        Column("last_used", Integer, nullable=False),
        # What computing the vector cost, in the model's tokens (NULL: not known, as for
        # every vector stored before schema s0004, or from a backend or a push), and whether
        # that is the tokenizer's count or an estimate from the text's length.
        Column("tokens", Integer, nullable=True),
        Column("tokens_exact", Boolean, nullable=True),
    ]


def embedding_table(metadata: MetaData, name: str = "embedding") -> Table:
    """Vectors keyed by their digest: Postgres's shard, and SQLite's overflow."""
    return Table(
        name,
        metadata,
        Column("hashid", LargeBinary(KEY_BYTES), primary_key=True),
        *_vector_columns(),
    )


def sqlite_embedding_table(metadata: MetaData, name: str = "embedding") -> Table:
    """Vectors found by the first 8 bytes of their digest, through a unique index (SQLite,
    schema s0006). The table has no primary key: its rows live under SQLite's rowid, in the
    order they were written."""
    return Table(
        name,
        metadata,
        Column("id", Integer, nullable=False),
        Column("hashid", LargeBinary(KEY_BYTES), nullable=False),
        *_vector_columns(),
        Index(f"{name}_id", "id", unique=True),
    )


def model_info_table(metadata: MetaData, name: str = "model_info") -> Table:
    return Table(
        name,
        metadata,
        # One row per shard: the constraint keeps it that way.
        Column("id", Integer, CheckConstraint("id = 1"), primary_key=True),
        Column("model", Text, nullable=False),
        Column("dimension", Integer, nullable=False),
        Column("dtype", Text, nullable=False),
        Column("library_version", Text, nullable=False),
        Column("created_at", Integer, nullable=False),
        Column("revision", Text, nullable=True),  # the model's commit, when known
        # Lookups of the model's vectors over every run since the shard was created (or
        # upgraded to schema s0003), counted in memory and added in batches.
        Column("hits", BigInteger, nullable=False, server_default="0"),
        Column("misses", BigInteger, nullable=False, server_default="0"),
        # The stored token counts of those hits (s0004): tokens not paid for again.
        Column("tokens_saved", BigInteger, nullable=False, server_default="0"),
        # Whether any vector of the shard has its tokens counted (s0004): only then does a
        # lookup read embedding.tokens, a column past the vector that costs ~4% of a hit.
        Column("counts_tokens", Boolean, nullable=False, server_default=false()),
    )


def claim_table(metadata: MetaData, name: str = "claim") -> Table:
    """Claims of texts being computed: ``owner`` names one claim (a random 63-bit number),
    ``expires`` is when its lease ends (seconds since the epoch), ``done`` says its holder
    let it go, and ``keys`` are the claimed texts' 8-byte ids, little-endian, end to end."""
    return Table(
        name,
        metadata,
        Column("owner", BigInteger, primary_key=True, autoincrement=False),
        Column("expires", Float, nullable=False),
        Column("done", Boolean, nullable=False),
        Column("keys", LargeBinary, nullable=False),
    )
