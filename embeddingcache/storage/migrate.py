"""Bring a place's tables to the current schema, with Alembic.

A place is at head when its ``alembic_version`` table says so: one SELECT, done once per place
per process, and Alembic is imported only when something is to be done. Then, under a lock
(SQLite: ``BEGIN IMMEDIATE``; Postgres: a transaction-scoped advisory lock), the state is read
again and:

- a new place is created from the table definitions and stamped at head;
- a place of embeddingcache 0.1.0 (tables, no version table) is stamped at its first revision
  and upgraded;
- an older place is upgraded in place, its rows kept.

All of it runs in one transaction, so several processes opening a new cache at once all succeed
and a crash leaves the place as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.schema import CreateSchema

from .places import Place, TextPlace
from .sqlite import write_transaction
from .timeouts import unbounded

__all__ = ["HEADS", "READABLE", "Kind", "ensure", "migrate", "revision", "script_location"]

Kind = Literal["text", "shard"]

# The head revision of each branch; a test checks them against the scripts.
HEADS: dict[str, str] = {"text": "t0001", "shard": "s0007"}
# Older revisions the current code reads as they are, where a place cannot be upgraded (a
# read-only cache): s0006 moved a shard's rows, not what a read asks of them, and s0007 added
# the claims, which a read-only cache never takes.
READABLE: dict[str, frozenset[str]] = {
    "text": frozenset(),
    "shard": frozenset({"s0005", "s0006"}),
}
# What embeddingcache 0.1.0 created, before it kept a version table.
FIRST: dict[str, str] = {"text": "t0001", "shard": "s0001"}
_MAIN_TABLE: dict[str, str] = {"text": "hashstring", "shard": "model_info"}


def kind_of(place: Place) -> Kind:
    return "text" if isinstance(place, TextPlace) else "shard"


def script_location() -> str:
    """The migration scripts' folder, wherever the package is installed."""
    migrations = importlib.import_module("embeddingcache.migrations")
    return str(Path(str(migrations.__file__)).parent)


def state(
    connection: Connection, place: Place, *, as_is: bool = False
) -> Literal["head", "old", "missing"]:
    """Read-only: is the place at head, older, or not there at all? With ``as_is`` (a place
    that will not be upgraded), a revision the code reads as it is (`READABLE`) is head."""
    kind = kind_of(place)
    inspector = inspect(connection)
    if inspector.has_table("alembic_version", schema=place.schema):
        table = "alembic_version" if place.schema is None else f"{place.schema}.alembic_version"
        versions = set(connection.scalars(select(text("version_num")).select_from(text(table))))
        heads = {HEADS[kind], *READABLE[kind]} if as_is else {HEADS[kind]}
        return "head" if len(versions) == 1 and versions <= heads else "old"
    if inspector.has_table(_MAIN_TABLE[kind], schema=place.schema):
        return "old"
    return "missing"


def revision(connection: Connection, place: Place) -> str | None:
    """The place's schema revision, as its ``alembic_version`` table says (``None``: none);
    read-only."""
    if not inspect(connection).has_table("alembic_version", schema=place.schema):
        return None
    table = "alembic_version" if place.schema is None else f"{place.schema}.alembic_version"
    found = connection.scalars(select(text("version_num")).select_from(text(table))).first()
    return None if found is None else str(found)


def ensure(place: Place, *, create: bool) -> bool:
    """Whether the place exists at head after this call; creates it only if ``create``."""
    with place.engine.connect() as connection:
        current = state(connection, place)
    if current == "head":
        return True
    if current == "missing" and not create:
        return False
    migrate(place)
    return True


_ALEMBIC = threading.Lock()


def migrate(place: Place) -> None:
    """Create or upgrade the place to head, under a lock, in one transaction."""
    from alembic import command
    from alembic.config import Config

    kind = kind_of(place)
    # Alembic runs a script through module-level proxies (`alembic.context`, `alembic.op`),
    # which two threads of one process must not set at once (two caches opening new places:
    # KeyError 'script'); the database's own lock orders processes.
    with _ALEMBIC, _locked(place) as connection:
        if place.schema is not None:
            connection.execute(CreateSchema(place.schema, if_not_exists=True))
        current = state(connection, place)
        if current == "head":
            return
        config = Config()
        config.set_main_option("script_location", script_location())
        config.attributes["connection"] = connection
        config.attributes["schema"] = place.schema
        if current == "missing":
            place.metadata.create_all(connection)
            command.stamp(config, f"{kind}@head")
            return
        if not inspect(connection).has_table("alembic_version", schema=place.schema):
            command.stamp(config, FIRST[kind])
        command.upgrade(config, f"{kind}@head")


@contextmanager
def _locked(place: Place) -> Iterator[Connection]:
    dialect = place.engine.dialect.name
    if dialect == "sqlite":
        with write_transaction(place.engine) as connection:
            yield connection
        return
    # Unbounded: an upgrade may rewrite a big shard, and the processes that open the cache
    # meanwhile wait for its lock (Postgres's timeouts would end both: timeouts.py).
    with unbounded(), place.engine.begin() as connection:
        if dialect == "postgresql":
            name = f"embeddingcache:{place.schema}".encode()
            key = int.from_bytes(hashlib.sha256(name).digest()[:8], "big", signed=True)
            connection.execute(select(text(f"pg_advisory_xact_lock({key})")))
        yield connection
