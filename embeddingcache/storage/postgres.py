"""Postgres through psycopg: the hit path, and connections whose every wait is bounded.

A hit through SQLAlchemy paid a pool checkout with a ping (a round trip of its own), the
rendering of an expanding ``IN`` and its result machinery: 9.7x raw psycopg for one cached
text (issue 18). Here a lookup is one prepared ``= ANY(%s)`` per chunk of keys on a connection
the thread keeps, its vectors read in binary. Writes keep SQLAlchemy and its pool.

Every connection, the hit path's and SQLAlchemy's (`bind`), is a `BoundedConnection`: its
database's `Gate` and the watchdog bound each of its waits (see `timeouts`, issue 30).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy import URL, Engine, event
from sqlalchemy import exc as sa_exc

from .retry import NotRetried, is_away, is_transient, retry_write
from .tables import HitRow, postgres_get_sql
from .timeouts import (
    CUT_GRACE_S,
    ENV_OUTAGE,
    ENV_STATEMENT_TIMEOUT,
    WATCHDOG,
    Gate,
    Timeouts,
    cut,
    is_unbounded,
)

__all__ = [
    "Away",
    "BoundedConnection",
    "NeverReached",
    "PostgresConnections",
    "PostgresReader",
    "bind",
    "connect",
    "connect_args",
]


class Away(NotRetried, psycopg.OperationalError):
    """The database has been away for longer than it is waited for: not tried now."""


class NeverReached(NotRetried, psycopg.OperationalError):
    """The first connection of this process to a database was refused: a wrong URL, more
    likely than an outage, and an error to fix (docs/reliability.md, promise 4)."""


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose waits for the server are bounded: cut by the watchdog past
    the statement timeout (a server that does not run), cut at once while its database is
    away for longer than it is waited for (`Gate`)."""

    gate: Gate | None = None  # set once connected
    deadline = 0.0  # when the watchdog cuts the wait in progress (timeouts.Watched)
    was_cut = False

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        """psycopg's one place that waits for the server (queries, fetches, commits)."""
        gate = self.gate
        if gate is None or is_unbounded():
            return psycopg.Connection.wait(self, gen, *args, **kwargs)
        if gate.outage:
            return self._wait_in_outage(gate, gen, *args, **kwargs)
        # The hit path: a deadline for the watchdog, and nothing else (issue 30 measured it).
        return self._bounded(gate, None, gen, *args, **kwargs)

    def _wait_in_outage(self, gate: Gate, gen: Any, *args: Any, **kwargs: Any) -> Any:
        """`wait` while the database is away: cut at once past its outage (but for one try
        in each `OUTAGE_S`); the outage ends when the server answers."""
        talked: list[bool] = []
        result = self._bounded(gate, gate.shut(), _noting(gen, talked), *args, **kwargs)
        if talked:  # the server answered (not a mere setting of an idle connection)
            gate.answered()
        return result

    def _bounded(self, gate: Gate, away: float | None, gen: Any, *args: Any, **kwargs: Any) -> Any:
        """psycopg's wait, cut by the watchdog past its deadline, or at once if ``away``."""
        if away is None:
            self.deadline = time.monotonic() + gate.cut_after
        else:
            # Cut rather than refused before the query: the connection is then broken, so
            # that SQLAlchemy drops it (and rolls nothing back on it) as any lost one.
            cut(self)
        try:
            return psycopg.Connection.wait(self, gen, *args, **kwargs)
        except psycopg.OperationalError as exc:
            error = self._failure(gate, exc, away)
            if error is exc:
                raise
            raise error from exc
        finally:
            self.deadline = 0.0

    def _failure(
        self, gate: Gate, exc: psycopg.OperationalError, away: float | None
    ) -> psycopg.OperationalError:
        """The error a failed wait raises, the gate told of an outage."""
        if away is not None:
            return _away(gate, away)
        started = self.deadline - gate.cut_after
        if self.was_cut:
            self.was_cut = False
            gate.failed(started)
            return psycopg.OperationalError(
                f"the database did not answer within {gate.cut_after:g} s "
                f"({ENV_STATEMENT_TIMEOUT} and {CUT_GRACE_S:g} s): the connection was cut"
            )
        if is_away(exc):
            gate.failed(started)
        return exc


def _away(gate: Gate, away: float) -> Away:
    outage = gate.timeouts.outage_s
    return Away(
        f"the database has not answered for {away:.0f} s, longer than {ENV_OUTAGE} "
        f"({outage:g} s): not waiting for it; it is tried again every {outage:g} s"
    )


def connect(gate: Gate, *args: Any, **kwargs: Any) -> BoundedConnection:
    """``psycopg.connect(*args, **kwargs)``, bounded by ``gate``.

    Raises:
        Away: the database has been away for longer than it is waited for.
        NeverReached: a first connection was refused (or timed out).
        psycopg.OperationalError: the connection failed (an outage once it was reached).
    """
    away = gate.shut()
    if away is not None:
        raise _away(gate, away)
    started = time.monotonic()
    try:
        connection = BoundedConnection.connect(*args, **kwargs)
    except psycopg.OperationalError as exc:
        if not is_away(exc):
            raise
        if not gate.reached:
            raise NeverReached(str(exc)) from exc
        gate.failed(started)
        raise
    connection.gate = gate
    WATCHDOG.watch(connection)
    gate.answered()
    return connection


def _noting(gen: Any, talked: list[bool]) -> Any:
    """``gen`` as it is, noting in ``talked`` whether it waited for the server at all:
    setting ``autocommit`` on an idle connection (SQLAlchemy's ping does) does not, and must
    not end an outage."""
    try:
        state = next(gen)
        talked.append(True)
        while True:
            state = gen.send((yield state))
    except StopIteration as done:
        return done.value


def connect_args(url: URL, timeouts: Timeouts) -> dict[str, Any]:
    """libpq parameters that bound a connection's waits; a URL's own ``connect_timeout``,
    and its ``options`` (after ours: the last setting of a name wins), take precedence."""
    options = timeouts.server_options()
    own = url.query.get("options")
    args: dict[str, Any] = {"options": f"{options} {own}" if isinstance(own, str) else options}
    if "connect_timeout" not in url.query:
        args["connect_timeout"] = timeouts.connect_timeout
    return args


def bind(engine: Engine, gate: Gate) -> None:
    """Make a SQLAlchemy engine's connections `BoundedConnection` s of ``gate``, and its
    transactions inside `timeouts.unbounded` free of the statement and lock timeouts."""

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> BoundedConnection:
        return connect(gate, *cargs, **cparams)

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        if is_unbounded():
            # The transaction's first statement (psycopg begins it implicitly): both are
            # local to it, and the connection goes back to the pool as it came.
            connection.connection.dbapi_connection.execute(
                "SELECT set_config('statement_timeout', '0', true), "
                "set_config('lock_timeout', '0', true)"
            )


class _Local(threading.local):
    connection: Any = None
    generation = -1


class PostgresConnections:
    """Read-only psycopg connections to one database, one per thread, shared by every shard's
    reader: a process holds at most one per thread that reads, whatever the models.
    A thread that ends leaves its connection to the garbage collector."""

    def __init__(self, url: URL, gate: Gate) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._gate = gate
        self._args = connect_args(url, gate.timeouts)
        self._local = _Local()
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()
        self._generation = 0
        self._lock = threading.Lock()

    def get(self) -> Any:
        """This thread's connection, opened on first use."""
        local = self._local
        if local.connection is None or local.generation != self._generation:
            # autocommit: each SELECT is its own snapshot, and no transaction stays open.
            connection = connect(self._gate, self._conninfo, autocommit=True, **self._args)
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

    A connection the server dropped is replaced, and the query run again; a database away (a
    restart) is waited for as writes wait for it (`retry.retry_write`, within its outage).
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
        try:
            return self._rows(self._connections.get(), keys, chunk)  # the hit path
        except psycopg.Error as exc:
            error = self._error(exc)
            if not is_transient(error):
                raise error from exc
        return retry_write(lambda: self._again(keys, chunk))

    def _again(self, keys: Sequence[bytes], chunk: int) -> list[Any]:
        try:
            return self._rows(self._connections.get(), keys, chunk)
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _error(self, exc: psycopg.Error) -> sa_exc.DBAPIError:
        """SQLAlchemy's error for ``exc``, as every other storage error: the store's handling
        and its messages (the driver's reason, the password masked) stay one. A connection
        the server dropped is forgotten, and the error says so (it is worth retrying)."""
        dropped = self._connections.drop()
        error = sa_exc.DBAPIError.instance(
            self._query, None, exc, psycopg.Error, connection_invalidated=dropped
        )
        assert isinstance(error, sa_exc.DBAPIError)
        return error

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
