"""Every statement against the cache's tables, written once for every backend.

The store, eviction, export and import, and the SQLite hit path all reach the tables through
`ShardTable` (a model shard's ``embedding`` and ``model_info``) and `TextTable` (``hashstring``):
nothing outside this module writes SQL against them, and a new shard layout changes this module
and ``layout.py`` only. Each backend implements both (`SQLiteShardTable`, `PostgresShardTable`,
and their text tables), from the statements they share; `shard_table` and `text_table` pick the
one of a place. Each method runs on a connection its caller holds, so the caller decides
what one transaction covers; keys go in chunks of ``READ_CHUNK`` (``IN (...)`` lists) and rows in
writes of ``WRITE_BATCH``.

The operations: ``get`` stored rows by key, ``put_new`` rows (keeping those already stored, and
saying how many were), iterate ``after`` a key in key order and ``by_use`` in order of last use,
``delete`` by key, and the bookkeeping a shard needs (its model row, its use counts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Connection, bindparam, case, delete, func, select, union_all, update
from sqlalchemy import exc as sa_exc
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.dml import Insert

from ..errors import StorageError
from .schema import KEY_BYTES, OVERFLOW

logger = logging.getLogger("embeddingcache.storage")

if TYPE_CHECKING:
    from .places import ShardPlace, TextPlace

__all__ = [
    "READ_CHUNK",
    "WRITE_BATCH",
    "HitRow",
    "PostgresShardTable",
    "PostgresTextTable",
    "SQLiteGet",
    "SQLiteShardTable",
    "SQLiteTextTable",
    "ShardTable",
    "TextTable",
    "key_ids",
    "postgres_get_sql",
    "shard_table",
    "sqlite_get_sql",
    "text_table",
]

# Keys per SELECT ... IN (...): well under SQLite's 32,766 bound parameters and Postgres's
# 65,535, and large enough that the per-query cost vanishes next to the rows.
READ_CHUNK = 2000
# Rows per write transaction: big enough to amortize the commit, small enough that a writer
# holds the SQLite lock for a short while only.
WRITE_BATCH = 2000

# What a lookup reads of a stored vector: its key, its bytes, its last use (to the day) and
# the tokens it cost (``None`` when not known).
HitRow = tuple[bytes, bytes, int, int | None]


def _hit_columns(tokens: bool) -> str:
    # A shard that counts no tokens reads a constant instead of the column: one shape of
    # row for the caller, and SQLite need not decode the record past the vector (issue 16:
    # reading the column cost ~4% of a warm hit, the constant ~1%).
    return f"hashid, vector, last_used, {'tokens' if tokens else 'NULL'}"


def sqlite_get_sql(table: str, n: int, *, tokens: bool = False, columns: str | None = None) -> str:
    """``get``'s statement for ``n`` keys in plain sqlite3 (the hit path, see ``sqlite.Reader``),
    reading the tokens each vector cost when the shard counts them: by ``id`` (see `key_ids`)
    in ``embedding``, by ``hashid`` in the overflow. Every row it returns has its ``hashid``
    compared with the keys asked for (`SQLiteGet`): an id is not a key."""
    column = "hashid" if table == OVERFLOW else "id"
    what = columns or _hit_columns(tokens)
    return f"SELECT {what} FROM {table} WHERE {column} IN ({','.join('?' * n)})"


# Digests whose ids are computed one by one: for a handful, numpy's setup costs more.
_FEW_KEYS = 8
# A 64-byte digest read as its 8-byte big-endian prefix, signed, and the rest.
_DIGEST = np.dtype([("id", ">i8"), ("rest", f"V{KEY_BYTES - 8}")])


def key_ids(keys: Sequence[bytes]) -> list[int]:
    """The ``id`` of each key in a SQLite shard's ``embedding``: its first 8 bytes as a
    big-endian signed 64-bit integer. Many keys go through numpy at once."""
    if len(keys) > _FEW_KEYS:
        joined = b"".join(keys)
        if len(joined) == KEY_BYTES * len(keys):
            ids: list[int] = np.frombuffer(joined, _DIGEST)["id"].tolist()
            return ids
    # A few keys, or keys that are not all digests (short ones are padded: their id may be
    # another key's, which the overflow then holds, as for any collision).
    return [int.from_bytes(bytes(k[:8]).ljust(8, b"\0"), "big", signed=True) for k in keys]


Execute = Callable[[str, Sequence[Any]], list[Any]]


class SQLiteGet:
    """Rows by key from a SQLite shard, on any connection (``execute`` runs one statement
    with its parameters and returns the rows): ``embedding`` by id, every row's ``hashid``
    compared with the keys, then the overflow for the keys not found, if any. Statements are
    kept by number of keys, so a query is built once."""

    def __init__(self, table: str = "embedding") -> None:
        self._table = table
        self._queries: dict[tuple[str, int, bool, str | None], str] = {}

    def _query(self, table: str, n: int, tokens: bool, columns: str | None) -> str:
        key = (table, n, tokens, columns)
        query = self._queries.get(key)
        if query is None:
            query = self._queries[key] = sqlite_get_sql(table, n, tokens=tokens, columns=columns)
        return query

    def rows(
        self,
        execute: Execute,
        keys: Sequence[bytes],
        chunk: int,
        *,
        tokens: bool = False,
        columns: str | None = None,
    ) -> list[Any]:
        """The rows of ``keys`` (their first column the ``hashid``), in no particular order.

        A row whose id matched but whose ``hashid`` is another key's is dropped: a prefix
        collision never serves the other key's vector.
        """
        ids = key_ids(keys)
        found: list[Any] = []
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            found += execute(self._query(self._table, len(part), tokens, columns), part)
        wanted = set(keys)
        rows = [row for row in found if row[0] in wanted]
        if len(rows) < len(wanted):
            # Keys not in `embedding` may be in the overflow. Only a lookup with misses (or
            # a collision) pays this query; full hits never do.
            missing = list(wanted.difference(row[0] for row in rows))
            for start in range(0, len(missing), chunk):
                keys_part = missing[start : start + chunk]
                rows += execute(self._query(OVERFLOW, len(keys_part), tokens, columns), keys_part)
        return rows


def postgres_get_sql(table: str, *, one: bool = False) -> str:
    """``get``'s statement in plain psycopg (the hit path, see ``postgres.PostgresReader``):
    for any number of keys, one array parameter, so that one prepared statement serves all;
    for ``one`` key, an equality, which Postgres plans and binds faster."""
    where = "hashid = %s" if one else "hashid = ANY(%s)"
    # Postgres decodes the whole row anyway: reading tokens costs nothing measurable, where a
    # constant in its place cost 0.5 us of a 27 us lookup of one key (issue 16).
    return f"SELECT {_hit_columns(True)} FROM {table} WHERE {where}"


def _keys_in(column: Any) -> Any:
    return column.in_(bindparam("keys", expanding=True))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _put_new(connection: Connection, statement: Insert, rows: Sequence[dict[str, Any]]) -> int:
    """Insert the rows whose key is not stored yet (``statement`` skips the others); how many
    were already there."""
    kept = 0
    for part in _chunks(rows, WRITE_BATCH):
        result = connection.execute(statement, list(part))
        # Postgres counts no executemany: its inserts return the keys they stored instead.
        inserted = len(result.all()) if result.returns_rows else result.rowcount
        # A driver that cannot count an executemany says -1: no conflict is reported then.
        kept += len(part) - inserted if inserted >= 0 else 0
    return kept


class ShardTable:
    """The statements against one model shard: its vectors and its model row.

    A backend's subclass says how an insert skips a key already stored (``_insert_new``).
    """

    def __init__(self, place: ShardPlace) -> None:
        self.place = place
        self.embedding = table = place.embedding
        self.model_info = place.model_info
        self._get = select(table.c.hashid, table.c.vector, table.c.last_used, table.c.tokens).where(
            _keys_in(table.c.hashid)
        )
        self._holding = select(table.c.hashid).where(_keys_in(table.c.hashid))
        self._delete = delete(table).where(_keys_in(table.c.hashid))
        self._put = self._insert_new(table)
        self._claim = self._insert_new(self.model_info)

    @staticmethod
    def _insert_new(table: Any) -> Insert:
        raise NotImplementedError

    def get(self, connection: Connection, keys: Sequence[bytes]) -> list[Any]:
        """``(hashid, vector, last_used, tokens)`` of the stored ``keys``, in no particular
        order."""
        rows: list[Any] = []
        for part in _chunks(keys, READ_CHUNK):
            rows += connection.execute(self._get, {"keys": list(part)})
        return rows

    def count_tokens(self, connection: Connection) -> None:
        """Mark the shard as one that holds token counts: its lookups read them from now on."""
        info = self.model_info
        connection.execute(
            update(info).where(info.c.counts_tokens.is_(False)).values(counts_tokens=True)
        )

    def holding(self, connection: Connection, keys: Sequence[bytes]) -> set[bytes]:
        """The keys of ``keys`` this shard holds a vector for."""
        found: set[bytes] = set()
        for part in _chunks(keys, READ_CHUNK):
            found.update(bytes(k) for k in connection.scalars(self._holding, {"keys": list(part)}))
        return found

    def put_new(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """Store vector rows, keeping any already stored under their key; how many were."""
        return _put_new(connection, self._put, rows)

    def delete(self, connection: Connection, keys: Sequence[bytes]) -> None:
        for part in _chunks(keys, READ_CHUNK):
            connection.execute(self._delete, {"keys": list(part)})

    def empty(self, connection: Connection) -> None:
        """Remove every vector and the model row: the shard then belongs to no model."""
        connection.execute(delete(self.embedding))
        connection.execute(delete(self.model_info))

    def after(self, connection: Connection, last: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """``(hashid, vector)`` of the next ``limit`` keys after ``last``, in key order.

        Keyset pagination reads each chunk through the primary key however far in, and a row
        another writer adds or removes meanwhile neither shifts nor repeats the rest.
        """
        table = self.embedding
        query = (
            select(table.c.hashid, table.c.vector)
            .where(table.c.hashid > last)
            .order_by(table.c.hashid)
            .limit(limit)
        )
        return [(bytes(k), bytes(v)) for k, v in connection.execute(query)]

    def by_use(self, connection: Connection) -> Iterator[tuple[int, int, bytes]]:
        """``(last_used, created_at, hashid)`` of every vector, least recently used first
        (then oldest created), streamed."""
        table = self.embedding
        query = select(table.c.last_used, table.c.created_at, table.c.hashid).order_by(
            table.c.last_used, table.c.created_at, table.c.hashid
        )
        for last_used, created_at, key in connection.execution_options(
            yield_per=READ_CHUNK
        ).execute(query):
            yield last_used, created_at, bytes(key)

    def unused_since(self, connection: Connection, cutoff: int) -> list[bytes]:
        table = self.embedding
        return [
            bytes(k)
            for k in connection.scalars(select(table.c.hashid).where(table.c.last_used < cutoff))
        ]

    def touch(self, connection: Connection, keys: Sequence[bytes], now: int, older: int) -> None:
        """Set ``last_used`` to ``now`` on the keys whose stored one is before ``older``."""
        table = self.embedding
        statement = (
            update(table)
            .where(_keys_in(table.c.hashid))
            .where(table.c.last_used < older)
            .values(last_used=now)
        )
        for part in _chunks(keys, READ_CHUNK):
            connection.execute(statement, {"keys": list(part)})

    def count(self, connection: Connection) -> int:
        return int(connection.scalar(select(func.count()).select_from(self.embedding)) or 0)

    def info(self, connection: Connection) -> Any | None:
        """The model row, or ``None`` when the shard belongs to no model yet."""
        return connection.execute(select(self.model_info)).first()

    def claim(self, connection: Connection, row: dict[str, Any]) -> Any:
        """The model row, written first if there is none. Another writer may be claiming the
        shard at this moment: insert-or-ignore, then read back whoever won."""
        found = self.info(connection)
        if found is None:
            connection.execute(self._claim, {"id": 1, **row})
            found = connection.execute(select(self.model_info)).one()
        return found

    def claim_revision(self, connection: Connection, revision: str) -> str | None:
        """The model's version recorded in the model row: ``revision`` if the row had none
        (a shard of an earlier embeddingcache, or one claimed without it), else the one
        it holds."""
        info = self.model_info
        connection.execute(update(info).where(info.c.revision.is_(None)).values(revision=revision))
        found = connection.execute(select(info.c.revision)).first()
        return None if found is None else found.revision

    def add_use(
        self, connection: Connection, hits: int, misses: int, tokens_saved: int = 0
    ) -> None:
        info = self.model_info
        connection.execute(
            update(info).values(
                hits=info.c.hits + hits,
                misses=info.c.misses + misses,
                tokens_saved=info.c.tokens_saved + tokens_saved,
            )
        )

    def token_totals(self, connection: Connection) -> tuple[int, int, int]:
        """``(vectors counted, their tokens, the part of those that is estimated)``: what
        the stored vectors cost, over the rows whose cost is known. One scan, for ``stats``."""
        table = self.embedding
        estimated = func.sum(case((table.c.tokens_exact.is_(False), table.c.tokens), else_=0))
        row = connection.execute(
            select(func.count(table.c.tokens), func.sum(table.c.tokens), estimated)
        ).one()
        return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)


class TextTable:
    """The statements against the texts: key to the exact string it was computed from.

    A backend's subclass says how an insert skips a key already stored (``_insert_new``).
    """

    def __init__(self, place: TextPlace) -> None:
        self.place = place
        self.hashstring = table = place.hashstring
        self._texts = select(table.c.hashid, table.c.text).where(_keys_in(table.c.hashid))
        self._delete = delete(table).where(_keys_in(table.c.hashid))
        self._put = self._insert_new(table)

    @staticmethod
    def _insert_new(table: Any) -> Insert:
        raise NotImplementedError

    def put_new(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """Store text rows, keeping any already stored under their key; how many were."""
        return _put_new(connection, self._put, rows)

    def texts(self, connection: Connection, keys: Sequence[bytes]) -> dict[bytes, str]:
        found: dict[bytes, str] = {}
        for part in _chunks(keys, READ_CHUNK):
            found.update(
                (bytes(k), t) for k, t in connection.execute(self._texts, {"keys": list(part)})
            )
        return found

    def keys_after(self, connection: Connection, last: bytes, limit: int) -> list[bytes]:
        """The next ``limit`` keys after ``last``, in key order (keyset pagination)."""
        column = self.hashstring.c.hashid
        query = select(column).where(column > last).order_by(column).limit(limit)
        return [bytes(k) for k in connection.scalars(query)]

    def delete(self, connection: Connection, keys: Sequence[bytes]) -> None:
        for part in _chunks(keys, READ_CHUNK):
            connection.execute(self._delete, {"keys": list(part)})

    def removals(self, connection: Connection) -> int | None:
        """A number that changes whenever ``delete`` removes texts, or ``None`` where the
        backend keeps none: a writer reads it before and after storing vectors, to learn
        whether a prune may have removed the texts it stored first."""
        return None

    def removing(self, connection: Connection) -> None:
        """Say that texts are about to be removed, before the check that picks them, where
        ``delete`` does not count them itself in a way writers wait for (see ``removals``)."""

    def count(self, connection: Connection) -> int:
        return int(connection.scalar(select(func.count()).select_from(self.hashstring)) or 0)


def _sqlite_insert_new(table: Any) -> Insert:
    return sqlite_insert(table).on_conflict_do_nothing()  # INSERT ... ON CONFLICT DO NOTHING


def _postgres_insert_new(table: Any) -> Insert:
    return pg_insert(table).on_conflict_do_nothing().returning(*table.primary_key.columns)


def _sqlite_put_new(connection: Connection, table: Any, rows: Sequence[dict[str, Any]]) -> int:
    """``put_new`` as one executemany of tuples in the transaction, without SQLAlchemy's
    per-row parameter processing (which cost more than SQLite's insert itself: issue 18)."""
    columns = list(table.c.keys())
    statement = (
        f"INSERT OR IGNORE INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' * len(columns))})"
    )
    kept = 0
    for part in _chunks(rows, WRITE_BATCH):
        # exec_driver_sql passes the tuples straight to executemany, and still turns the
        # driver's errors into SQLAlchemy's (which the retries and the store's errors know).
        result = connection.exec_driver_sql(
            # A column a row leaves out is NULL, as in SQLAlchemy's insert (a NOT NULL one
            # is refused by SQLite, naming it).
            statement,
            [tuple(row.get(c) for c in columns) for row in part],
        )
        kept += len(part) - result.rowcount
    return kept


def _postgres_put_new(connection: Connection, table: Any, rows: Sequence[dict[str, Any]]) -> int:
    """``put_new`` as one psycopg ``executemany`` of tuples per ``WRITE_BATCH``: psycopg 3
    pipelines its statements (one round trip for the batch) and counts what they inserted.
    SQLAlchemy's insert wrote one multi-row ``VALUES ... RETURNING`` string per 1,000 rows
    that psycopg then parsed, placeholder by placeholder: 85% of the time of a write
    (issue 18)."""
    columns = list(table.c.keys())
    name = connection.dialect.identifier_preparer.format_table(table)
    statement = (
        f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
        "ON CONFLICT DO NOTHING"
    )
    kept = 0
    for part in _chunks(rows, WRITE_BATCH):
        # A column a row leaves out is NULL, as in SQLAlchemy's insert; exec_driver_sql still
        # turns the driver's errors into SQLAlchemy's (which the retries know).
        result = connection.exec_driver_sql(
            statement, [tuple(row.get(c) for c in columns) for row in part]
        )
        kept += len(part) - result.rowcount
    return kept


class SQLiteShardTable(ShardTable):
    """A model shard in its own SQLite file: ``embedding`` keyed by `key_ids`, the full
    ``hashid`` compared on every read, and ``embedding_overflow`` for a key whose id another
    key holds (see schema.py). Every method covers both tables."""

    _insert_new = staticmethod(_sqlite_insert_new)

    def __init__(self, place: ShardPlace) -> None:
        super().__init__(place)
        assert place.overflow is not None
        self.overflow = overflow = place.overflow
        main = self.embedding.name
        self._reads = SQLiteGet(main)
        self._columns = columns = [c.name for c in self.embedding.c if c.name != "id"]
        names, marks = ", ".join(columns), ", ".join("?" * len(columns))
        self._insert_main = f"INSERT OR IGNORE INTO {main} (id, {names}) VALUES (?, {marks})"
        self._insert_overflow = f"INSERT OR IGNORE INTO {overflow.name} ({names}) VALUES ({marks})"
        self._any_overflow = f"SELECT EXISTS (SELECT 1 FROM {overflow.name})"
        self._delete_main = f"DELETE FROM {main} WHERE id = ? AND hashid = ?"
        self._delete_overflow = f"DELETE FROM {overflow.name} WHERE hashid = ?"
        touch = "UPDATE {} SET last_used = ? WHERE {} AND last_used < ?"
        self._touch_main = touch.format(main, "id = ? AND hashid = ?")
        self._touch_overflow = touch.format(overflow.name, "hashid = ?")

    @staticmethod
    def _execute(connection: Connection) -> Execute:
        def execute(sql: str, parameters: Sequence[Any]) -> list[Any]:
            return list(connection.exec_driver_sql(sql, tuple(parameters)))

        return execute

    def _overflowing(self, connection: Connection) -> bool:
        """Whether any key is in the overflow (almost never): one look at an empty table."""
        return bool(connection.exec_driver_sql(self._any_overflow).scalar())

    def get(self, connection: Connection, keys: Sequence[bytes]) -> list[Any]:
        return self._reads.rows(self._execute(connection), keys, READ_CHUNK)

    def holding(self, connection: Connection, keys: Sequence[bytes]) -> set[bytes]:
        rows = self._reads.rows(self._execute(connection), keys, READ_CHUNK, columns="hashid")
        return {bytes(row[0]) for row in rows}

    def put_new(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """``INSERT OR IGNORE`` into ``embedding``, in id order (the rows are appended; their
        index entries go in in order); only when rows were ignored are their ids read back,
        to tell a key stored already (kept) from a collision (stored in the overflow)."""
        columns = self._columns
        overflowing = self._overflowing(connection)
        kept = 0
        for part in _chunks(rows, WRITE_BATCH):
            keys = [row["hashid"] for row in part]
            if overflowing:
                held = self._in_overflow(connection, keys)
                if held:
                    kept += sum(1 for k in keys if k in held)
                    part = [row for row in part if row["hashid"] not in held]
                    keys = [row["hashid"] for row in part]
                    if not part:
                        continue
            ids = np.asarray(key_ids(keys), dtype=np.int64)
            order = np.argsort(ids, kind="stable").tolist()
            id_list = ids.tolist()
            values = [(id_list[i], *(part[i].get(c) for c in columns)) for i in order]
            # A column a row leaves out is NULL, as in SQLAlchemy's insert (a NOT NULL one
            # is refused by SQLite, naming it).
            result = connection.exec_driver_sql(self._insert_main, values)
            ignored = len(values) - result.rowcount
            if ignored:
                kept += self._overflow_collisions(connection, values, ignored)
        return kept

    def _in_overflow(self, connection: Connection, keys: Sequence[bytes]) -> set[bytes]:
        sql = sqlite_get_sql(OVERFLOW, len(keys), columns="hashid")
        return {bytes(k) for (k,) in connection.exec_driver_sql(sql, tuple(keys))}

    def _overflow_collisions(
        self, connection: Connection, values: list[tuple[Any, ...]], ignored: int
    ) -> int:
        """Of the ``ignored`` rows, store those whose id holds another key in the overflow;
        how many were kept (their key stored already)."""
        ids = sorted({v[0] for v in values})
        sql = sqlite_get_sql(self.embedding.name, len(ids), columns="id, hashid")
        holder: dict[int, bytes] = dict(connection.exec_driver_sql(sql, tuple(ids)).all())
        collisions = [v[1:] for v in values if holder.get(v[0]) != v[1]]
        if not collisions:
            return ignored
        result = connection.exec_driver_sql(self._insert_overflow, collisions)
        return ignored - result.rowcount

    def delete(self, connection: Connection, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        ids = key_ids(keys)
        connection.exec_driver_sql(self._delete_main, list(zip(ids, keys, strict=True)))
        if self._overflowing(connection):
            connection.exec_driver_sql(self._delete_overflow, [(k,) for k in keys])

    def empty(self, connection: Connection) -> None:
        connection.execute(delete(self.overflow))
        super().empty(connection)

    def touch(self, connection: Connection, keys: Sequence[bytes], now: int, older: int) -> None:
        if not keys:
            return
        ids = key_ids(keys)
        connection.exec_driver_sql(
            self._touch_main, [(now, i, k, older) for i, k in zip(ids, keys, strict=True)]
        )
        if self._overflowing(connection):
            connection.exec_driver_sql(self._touch_overflow, [(now, k, older) for k in keys])

    def after(self, connection: Connection, last: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """In key order, as on Postgres: ids from 0 up, then the negative ones (a digest's
        order is its unsigned prefix's), each row's key compared with ``last`` where the ids
        tie, merged with the overflow's keys after ``last``."""
        table, overflow = self.embedding, self.overflow
        start = key_ids([last])[0] if last else 0
        # Rows of the id range [start, 0) or [start, max]; from 0 on, then [min, 0) after.
        ranges = [(start, start < 0)] if start < 0 else [(start, False), (None, True)]
        rows: list[tuple[bytes, bytes]] = []
        for low, negative in ranges:
            query = select(table.c.hashid, table.c.vector).order_by(table.c.id)
            if low is not None:
                query = query.where(table.c.id >= low)
            if negative:
                query = query.where(table.c.id < 0)
            rows += [
                (bytes(k), bytes(v))
                for k, v in connection.execute(query.limit(limit + 1))
                if bytes(k) > last
            ]
            if len(rows) >= limit:
                break
        if self._overflowing(connection):
            query = (
                select(overflow.c.hashid, overflow.c.vector)
                .where(overflow.c.hashid > last)
                .order_by(overflow.c.hashid)
                .limit(limit)
            )
            rows += [(bytes(k), bytes(v)) for k, v in connection.execute(query)]
            rows.sort()
        return rows[:limit]

    def _both(self, *names: str, where: Any = None) -> Any:
        """One SELECT of the named columns over both tables (``where`` a function of one)."""
        parts = []
        for table in (self.embedding, self.overflow):
            query = select(*(table.c[n] for n in names))
            parts.append(query if where is None else query.where(where(table)))
        return union_all(*parts)

    def by_use(self, connection: Connection) -> Iterator[tuple[int, int, bytes]]:
        both = self._both("last_used", "created_at", "hashid").subquery()
        query = select(both).order_by(both.c.last_used, both.c.created_at, both.c.hashid)
        for last_used, created_at, key in connection.execution_options(
            yield_per=READ_CHUNK
        ).execute(query):
            yield last_used, created_at, bytes(key)

    def unused_since(self, connection: Connection, cutoff: int) -> list[bytes]:
        query = self._both("hashid", where=lambda t: t.c.last_used < cutoff)
        return [bytes(k) for k in connection.scalars(query)]

    def count(self, connection: Connection) -> int:
        return super().count(connection) + int(
            connection.scalar(select(func.count()).select_from(self.overflow)) or 0
        )

    def token_totals(self, connection: Connection) -> tuple[int, int, int]:
        both = self._both("tokens", "tokens_exact").subquery()
        estimated = func.sum(case((both.c.tokens_exact.is_(False), both.c.tokens), else_=0))
        row = connection.execute(
            select(func.count(both.c.tokens), func.sum(both.c.tokens), estimated)
        ).one()
        return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)


class PostgresShardTable(ShardTable):
    """A model shard in its own Postgres schema.

    Writers and ``empty`` (``prune --model``) meet on the model row. On SQLite a write
    transaction takes the file's lock first, so the two cannot interleave; Postgres lets a
    writer read the model row, ``empty`` then delete the vectors and the row, and the
    writer's vectors land in a shard that no model row vouches for, which the next writer
    may claim for another model or dimension (issue 18). So a writer holds the row ``FOR
    KEY SHARE`` until it commits (other writers and the use counts' updates do not wait
    for that), and ``empty`` deletes the row before the vectors: it waits for the writers
    that hold it, then removes their vectors too; a writer that comes after finds no row
    and claims the shard anew, its vectors with it."""

    _insert_new = staticmethod(_postgres_insert_new)

    def put_new(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
        return _postgres_put_new(connection, self.embedding, rows)

    def __init__(self, place: ShardPlace) -> None:
        super().__init__(place)
        self._held = select(self.model_info).with_for_update(read=True, key_share=True)

    def claim(self, connection: Connection, row: dict[str, Any]) -> Any:
        found = connection.execute(self._held).first()
        if found is None:
            connection.execute(self._claim, {"id": 1, **row})
            found = connection.execute(self._held).one()
        return found

    def empty(self, connection: Connection) -> None:
        connection.execute(delete(self.model_info))  # first: see the class's docstring
        connection.execute(delete(self.embedding))


class SQLiteTextTable(TextTable):
    """The texts in ``hashstring.db``. Removals are counted in the file's ``user_version``
    (a header field: no table, no migration), in the transaction that deletes."""

    _insert_new = staticmethod(_sqlite_insert_new)

    def put_new(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
        return _sqlite_put_new(connection, self.hashstring, rows)

    def delete(self, connection: Connection, keys: Sequence[bytes]) -> None:
        super().delete(connection, keys)
        removals = self.removals(connection) or 0
        # PRAGMA takes no bound parameter; the value is an int read from the file.
        connection.exec_driver_sql(f"PRAGMA user_version = {(removals + 1) % (1 << 31)}")

    def removals(self, connection: Connection) -> int | None:
        return int(connection.exec_driver_sql("PRAGMA user_version").scalar_one())


# The sequence that counts removals of texts on Postgres, created by the first writer or
# prune that finds it missing (no migration: without it, removals are not known).
REMOVALS_SEQUENCE = "text_removals"


class PostgresTextTable(TextTable):
    """The texts in the ``embeddingcache`` schema. Postgres text cannot hold NUL.

    Removals are counted in a sequence (``REMOVALS_SEQUENCE``): advanced by a prune before
    it checks which texts no vector refers to (``removing``), read by a writer before its
    texts and after its vectors, so that it puts its texts a second time only when a prune
    ran in between (the second insert of every text was a third of a write: issue 18). A
    sequence advances outside transactions, at once for every session: a prune that then
    rolls back costs a writer one needless second insert, never a lost text."""

    _insert_new = staticmethod(_postgres_insert_new)

    def __init__(self, place: TextPlace) -> None:
        super().__init__(place)
        schema = place.schema or "public"
        self._sequence = f"{schema}.{REMOVALS_SEQUENCE}"
        # No row: no sequence, or no right to read it. A sequence never advanced reads 0.
        # (NULL where this role may not read it: pg_sequences says NULL then too.)
        self._read = sql(
            "SELECT CASE WHEN has_sequence_privilege(c.oid, 'SELECT') "
            "THEN coalesce(s.last_value, 0) END "
            "FROM pg_sequences s JOIN pg_namespace n ON n.nspname = s.schemaname "
            "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.sequencename "
            "WHERE s.schemaname = :schema AND s.sequencename = :name"
        ).bindparams(schema=schema, name=REMOVALS_SEQUENCE)

    def removals(self, connection: Connection) -> int | None:
        value = connection.execute(self._read).scalar()
        if value is None and self._create(connection):
            value = connection.execute(self._read).scalar()
        # None (it cannot be made or read here): the writer puts its texts again, always.
        return None if value is None else int(value)

    def removing(self, connection: Connection) -> None:
        self._create(connection)
        connection.execute(sql("SELECT nextval(:name)"), {"name": self._sequence})

    def _create(self, connection: Connection) -> bool:
        """Create the sequence if it is missing; whether it exists now. A role that may not
        create it leaves the transaction as it was (a savepoint)."""
        try:
            with connection.begin_nested():
                # One creator at a time: two CREATE ... IF NOT EXISTS at once can collide.
                connection.execute(
                    sql("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                    {"key": f"embeddingcache:{self._sequence}"},
                )
                connection.exec_driver_sql(f"CREATE SEQUENCE IF NOT EXISTS {self._sequence}")
        except sa_exc.DBAPIError as exc:
            logger.debug("cannot create %s: %s", self._sequence, exc)
            return False
        return True

    def put_new(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
        return _postgres_put_new(connection, self.hashstring, [_without_nul(row) for row in rows])


def _dialect(place: ShardPlace | TextPlace) -> str:
    name = place.engine.dialect.name
    if name not in ("sqlite", "postgresql"):
        raise StorageError(f"unsupported database dialect {name!r}: SQLite or PostgreSQL only")
    return name


def shard_table(place: ShardPlace) -> ShardTable:
    """The shard table of a place, for its backend."""
    return SQLiteShardTable(place) if _dialect(place) == "sqlite" else PostgresShardTable(place)


def text_table(place: TextPlace) -> TextTable:
    """The text table of a place, for its backend."""
    return SQLiteTextTable(place) if _dialect(place) == "sqlite" else PostgresTextTable(place)


def _without_nul(row: dict[str, Any]) -> dict[str, Any]:
    """Postgres text cannot hold NUL: the readable copy of the text gets U+FFFD instead.
    The key is the hash of the exact text, so the vector is still found by it."""
    text = row["text"]
    return {**row, "text": text.replace("\x00", "\ufffd")} if "\x00" in text else row
