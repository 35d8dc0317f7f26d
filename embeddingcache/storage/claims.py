"""Claims: which texts of a shard are being computed, and by whom, in the store itself, so
that every process sharing it (on one machine through a SQLite folder, or on many through
Postgres) computes each text once.

A claim is one row of the shard's ``claim`` table: an owner (a random 63-bit number per
claim), the end of its lease, whether its holder let it go, and the claimed texts' ids (the
first 8 bytes of each key, packed). One row per claim rather than per text: taking,
renewing and letting go of a claim of 20,000 texts is one row written, not 20,000 (claiming
20,000 texts a row each, by hand with sqlite3, took 30-45 ms and letting them go 11 ms; a
fast model computes them in about half a second).

Taking a claim is one short write transaction, serialized per shard (SQLite's write lock; a
``SHARE ROW EXCLUSIVE`` lock of the table on Postgres, which readers never wait for): it
reads the rows, takes the texts that no live claim holds, and clears rows past their use.
A row whose lease ended (its holder died) or whose holder let it go stays one more lease, as
a marker: a text that it held may have been stored between the claimer's lookup and its
claim, so the claimer looks those texts up again (`Claim.recheck`) before computing them.
Only the markers let go after the claimer's lookup (``since``) are read: what was let go
before it was stored before it, and the lookup saw it. So a long job of one process, which
lets a claim go per chunk, never reads its own (its traced memory grew with the corpus when
it read them all: tests/test_big_jobs.py).

Clocks: a lease is measured against each process's own clock; machines sharing a Postgres
must agree on the time within a small part of the lease (NTP does).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy import exc as sa_exc

from .places import ShardPlace
from .retry import retry_write
from .sqlite import write_transaction
from .store import Store
from .tables import key_ids

__all__ = ["Claim", "ClaimTable", "new_owner"]


T = TypeVar("T")


def new_owner() -> int:
    """A claim's owner: random, so that processes on different machines never pick alike."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class Claim:
    """What a claim took: ``won`` marks the keys this claim holds now, ``recheck`` those of
    them that a claim which ended lately held (they may be stored already: look them up)."""

    owner: int
    won: np.ndarray
    recheck: np.ndarray


def _ids(keys: Sequence[bytes]) -> np.ndarray:
    return np.asarray(key_ids(keys), dtype=np.int64)


def _packed(blobs: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(blobs), dtype="<i8") if blobs else np.empty(0, np.int64)


class ClaimTable:
    """The claims of a store's shards (thread-safe: each call is its own transaction)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def claim(
        self, model: str, keys: Sequence[bytes], lease_s: float, *, since: float = 0.0
    ) -> Claim:
        """Claim the distinct ``keys`` of the model's shard that no live claim holds, for
        ``lease_s`` seconds (renew it to keep it longer); ``since`` is when the caller looked
        them up (claims let go before it are not rechecked).

        Raises:
            ReadOnlyStorageError: the shard cannot be written (nothing is claimed there).
            StorageError: the claim could not be written, after the retries.
        """
        place = self.store.writable_shard(model)
        ids = _ids(keys)
        owner = new_owner()

        def take() -> Claim:
            with write_transaction(place.engine) as connection:
                _lock(connection, place)
                return _take(connection, place, owner, ids, lease_s, since)

        return self._written(model, take)

    def held(self, model: str, keys: Sequence[bytes]) -> np.ndarray:
        """Which of ``keys`` a live claim holds now; read-only, no lock.

        Raises:
            StorageError: the claims could not be read.
        """
        place = self.store.writable_shard(model)
        table = place.claim
        try:
            with place.engine.connect() as connection:
                rows = connection.execute(
                    select(table.c["keys"]).where(
                        table.c["done"].is_(False), table.c["expires"] >= time.time()
                    )
                ).all()
        except sa_exc.SQLAlchemyError as exc:
            raise self.store.error(f"cannot read the claims of {model!r}", exc) from exc
        return np.isin(_ids(keys), _packed([bytes(row[0]) for row in rows]))

    def renew(self, model: str, owners: Sequence[int], lease_s: float) -> None:
        """Extend the leases of live claims ``owners`` to ``lease_s`` from now.

        Raises:
            StorageError: the claims could not be written, after the retries.
        """
        place = self.store.writable_shard(model)
        table = place.claim
        statement = (
            update(table)
            .where(table.c["owner"].in_(list(owners)), table.c["done"].is_(False))
            .values(expires=time.time() + lease_s)
        )
        self._execute(model, place, statement)

    def release(self, model: str, owner: int) -> None:
        """Let a claim go: its texts are stored, or given up (a waiter then claims them).

        Raises:
            StorageError: the claim could not be written, after the retries.
        """
        place = self.store.writable_shard(model)
        table = place.claim
        statement = (
            update(table).where(table.c["owner"] == owner).values(done=True, expires=time.time())
        )
        self._execute(model, place, statement)

    def count(self, model: str) -> int:
        """The claim rows of a shard, live or kept as markers (bounded: see the module)."""
        place = self.store.writable_shard(model)
        with place.engine.connect() as connection:
            return len(connection.execute(select(place.claim.c["owner"])).all())

    def _execute(self, model: str, place: ShardPlace, statement: Any) -> None:
        def run() -> None:
            with write_transaction(place.engine) as connection:
                connection.execute(statement)

        self._written(model, run)

    def _written(self, model: str, write: Callable[[], T]) -> T:
        try:
            return retry_write(write)
        except sa_exc.SQLAlchemyError as exc:
            raise self.store.error(f"cannot write the claims of {model!r}", exc) from exc


def _lock(connection: Connection, place: ShardPlace) -> None:
    """Serialize claimers of one shard: SQLite's write transaction already is; Postgres
    locks the claim table against other claimers only (readers never wait)."""
    if connection.dialect.name == "postgresql":
        name = connection.dialect.identifier_preparer.format_table(place.claim)
        connection.exec_driver_sql(f"LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE")


def _take(
    connection: Connection,
    place: ShardPlace,
    owner: int,
    ids: np.ndarray,
    lease_s: float,
    since: float,
) -> Claim:
    """One claim, inside the claimers' lock: the keys no live claim holds, and which of
    those a claim that ended lately (after ``since``, or by its lease) held."""
    table = place.claim
    now = time.time()
    done, expires = table.c["done"], table.c["expires"]
    # Rows past their use go first, unread: let go or dead for more than a lease.
    connection.execute(delete(table).where(expires < now - lease_s))
    rows = connection.execute(
        select(done, expires, table.c["keys"]).where(done.is_(False) | (expires >= since))
    ).all()
    live, ended = [], []
    for was_done, ends, packed in rows:
        if not was_done and ends >= now:
            live.append(bytes(packed))
        else:
            ended.append(bytes(packed))  # a marker: its texts may be stored already
    won = ~np.isin(ids, _packed(live))
    if won.any():
        connection.execute(
            insert(table).values(
                owner=owner, expires=now + lease_s, done=False, keys=ids[won].tobytes()
            )
        )
    return Claim(owner, won, won & np.isin(ids, _packed(ended)))
