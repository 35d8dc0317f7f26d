"""The Postgres hit path: plain psycopg connections, one per thread, and prepared statements.

A hit through SQLAlchemy paid a pool checkout with a ping (a round trip of its own), the
rendering of an expanding ``IN`` and its result machinery: 9.7x raw psycopg for one cached
text (issue 18). Here a lookup is one prepared ``= ANY(%s)`` per chunk of keys on a connection
the thread keeps, its vectors read in binary. Writes keep SQLAlchemy and its pool.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

from sqlalchemy import URL
from sqlalchemy import exc as sa_exc

from .tables import HitRow, postgres_get_sql

__all__ = ["PostgresConnections", "PostgresReader"]


class _Local(threading.local):
    connection: Any = None
    generation = -1


class PostgresConnections:
    """Read-only psycopg connections to one database, one per thread, shared by every shard's
    reader: a process holds at most one per thread that reads, whatever the models.
    A thread that ends leaves its connection to the garbage collector."""

    def __init__(self, url: URL) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._local = _Local()
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()
        self._generation = 0
        self._lock = threading.Lock()

    def get(self) -> Any:
        """This thread's connection, opened on first use."""
        local = self._local
        if local.connection is None or local.generation != self._generation:
            import psycopg

            # autocommit: each SELECT is its own snapshot, and no transaction stays open.
            connection = psycopg.connect(self._conninfo, autocommit=True)
            connection.read_only = True
            with self._lock:
                self._opened.add(connection)
                local.connection, local.generation = connection, self._generation
        return local.connection

    def drop(self) -> bool:
        """Forget this thread's connection if the server ended it; whether it did."""
        stale = self._local.connection
        if stale is None or not (stale.closed or stale.broken):
            return False
        self._local.connection = None
        return True

    def close(self) -> None:
        """Close every thread's connection; the next read opens a new one."""
        with self._lock:
            opened = list(self._opened)
            self._opened = weakref.WeakSet()
            self._generation += 1
        for connection in opened:
            connection.close()


class PostgresReader:
    """A shard's hits, on the connections of its database.

    A connection the server dropped is replaced once, and the query run again; a second
    failure is the caller's error.
    """

    def __init__(self, connections: PostgresConnections, table: str) -> None:
        self._connections = connections
        self._query = postgres_get_sql(table)
        self._one = postgres_get_sql(table, one=True)

    def rows(self, keys: Sequence[bytes], chunk: int, *, tokens: bool = False) -> list[HitRow]:
        """``(hashid, vector, last_used, tokens)`` of the stored ``keys``, one query per
        ``chunk``. The tokens each vector cost are read whatever ``tokens`` says: on Postgres
        they cost nothing to read (``tables.postgres_get_sql``).

        Raises:
            sqlalchemy.exc.DBAPIError: the database could not be read.
        """
        import psycopg

        try:
            try:
                return self._rows(self._connections.get(), keys, chunk)
            except psycopg.OperationalError:
                if not self._connections.drop():
                    raise
                return self._rows(self._connections.get(), keys, chunk)  # on a new connection
        except psycopg.Error as exc:
            # SQLAlchemy's error classes, as every other storage error: the store's handling
            # and its messages (the driver's reason, the password masked) stay one.
            raise sa_exc.DBAPIError.instance(self._query, None, exc, psycopg.Error) from exc

    def _rows(self, connection: Any, keys: Sequence[bytes], chunk: int) -> list[Any]:
        if len(keys) == 1:  # one cached text: a web service's every request
            cursor = connection.execute(self._one, (keys[0],), prepare=True, binary=True)
            return cursor.fetchall()  # type: ignore[no-any-return]
        found: list[Any] = []
        for start in range(0, len(keys), chunk):
            part = list(keys[start : start + chunk])
            cursor = connection.execute(self._query, (part,), prepare=True, binary=True)
            found += cursor.fetchall()
        return found

    def close(self) -> None:
        """Nothing to close: the connections are the database's (``ServerLayout.close``)."""
