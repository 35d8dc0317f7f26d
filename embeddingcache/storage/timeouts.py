"""How long a Postgres database is waited for: every wait is bounded (issue 30).

- Connecting: ``connect_timeout`` (`CONNECT_TIMEOUT_S`).
- A statement: the server's ``statement_timeout`` and ``lock_timeout``, set on every
  connection (`STATEMENT_TIMEOUT_S`, `LOCK_TIMEOUT_S`). A server that does not run at all (a
  ``SIGSTOP``, a frozen VM) never fires its own timers, and its kernel still acknowledges
  every packet, so no TCP setting notices either: a `Watchdog` thread cuts the socket of a
  wait that outlives the statement timeout by `CUT_GRACE_S`.
- An outage: a database that refuses connections or does not answer is waited for (the
  retries of retry.py) for `OUTAGE_S` from the start of the first wait that failed, across
  every call and thread of the process: a `Gate` per database. Past that, every use of it
  fails at once, and one use in each `OUTAGE_S` tries it again, so a call goes on without it
  (docs/reliability.md, promise 4) and the next call after it is back stores again.

Upkeep that may take long on a big shard (migrations, `prune`, `contents`, exports) runs
`unbounded`, without the statement and lock timeouts.

The libpq and psycopg side of this is in `embeddingcache.storage.postgres`; this module needs
no driver.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from .._util import positive_env

__all__ = [
    "CONNECT_TIMEOUT_S",
    "CUT_GRACE_S",
    "ENV_CONNECT_TIMEOUT",
    "ENV_LOCK_TIMEOUT",
    "ENV_OUTAGE",
    "ENV_STATEMENT_TIMEOUT",
    "LOCK_TIMEOUT_S",
    "OUTAGE_S",
    "STATEMENT_TIMEOUT_S",
    "WATCHDOG",
    "Gate",
    "Timeouts",
    "Watchdog",
    "Watched",
    "cut",
    "is_unbounded",
    "unbounded",
]

# The defaults keep a call's wait on a database that stopped answering under 30 s in all:
# the outage (15 s) and the wait in flight when it ends (a statement's 10 s and the grace),
# and the retries' last pause (2.25 s at most).
CONNECT_TIMEOUT_S = 5.0
ENV_CONNECT_TIMEOUT = "EMBEDDING_CACHE_DB_CONNECT_TIMEOUT_S"
STATEMENT_TIMEOUT_S = 10.0
ENV_STATEMENT_TIMEOUT = "EMBEDDING_CACHE_DB_STATEMENT_TIMEOUT_S"
LOCK_TIMEOUT_S = 5.0
ENV_LOCK_TIMEOUT = "EMBEDDING_CACHE_DB_LOCK_TIMEOUT_S"
OUTAGE_S = 15.0
ENV_OUTAGE = "EMBEDDING_CACHE_DB_OUTAGE_S"
# The watchdog cuts a wait this long after the server's own statement timeout, which ends a
# slow statement more gently (the connection stays usable) when the server runs.
CUT_GRACE_S = 1.0
# libpq counts its connect timeout in whole seconds, and treats less than 2 as 2.
_LIBPQ_MIN_CONNECT_S = 2


@dataclass(frozen=True)
class Timeouts:
    """The bounds on waiting for one database, in seconds."""

    connect_s: float = CONNECT_TIMEOUT_S
    statement_s: float = STATEMENT_TIMEOUT_S
    lock_s: float = LOCK_TIMEOUT_S
    outage_s: float = OUTAGE_S

    @classmethod
    def from_env(cls) -> Timeouts:
        """The defaults, or the seconds the ``EMBEDDING_CACHE_DB_*`` variables name.

        Raises:
            InvalidInputError: a variable is not a positive number.
        """
        return cls(
            positive_env(ENV_CONNECT_TIMEOUT, CONNECT_TIMEOUT_S, float),
            positive_env(ENV_STATEMENT_TIMEOUT, STATEMENT_TIMEOUT_S, float),
            positive_env(ENV_LOCK_TIMEOUT, LOCK_TIMEOUT_S, float),
            positive_env(ENV_OUTAGE, OUTAGE_S, float),
        )

    @property
    def connect_timeout(self) -> int:
        """libpq's ``connect_timeout``: whole seconds, 2 at least."""
        return max(_LIBPQ_MIN_CONNECT_S, math.ceil(self.connect_s))

    @property
    def cut_after(self) -> float:
        """When the watchdog cuts a wait for an answer."""
        return self.statement_s + CUT_GRACE_S

    def server_options(self) -> str:
        """libpq ``options`` that set the server's timeouts for a connection's statements."""
        statement, lock = round(self.statement_s * 1000), round(self.lock_s * 1000)
        return f"-c statement_timeout={statement} -c lock_timeout={lock}"


_UNBOUNDED: ContextVar[bool] = ContextVar("embeddingcache_db_unbounded", default=False)


@contextmanager
def unbounded() -> Iterator[None]:
    """Statements in this block (in this thread) run without the statement and lock
    timeouts, and the watchdog leaves them alone: upkeep that may take long on a big shard.
    Connecting stays bounded."""
    token = _UNBOUNDED.set(True)
    try:
        yield
    finally:
        _UNBOUNDED.reset(token)


def is_unbounded() -> bool:
    """Whether the current block runs `unbounded`."""
    return _UNBOUNDED.get()


class Gate:
    """One database's outage clock: whether it is waited for now (thread-safe)."""

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self.cut_after = timeouts.cut_after  # read by every wait
        self.reached = False  # a connection succeeded once: a refusal now is an outage
        self._since: float | None = None  # when the first failed wait of the outage began
        self._tried = 0.0  # when the database was last tried, past the outage
        self._lock = threading.Lock()

    @property
    def outage(self) -> bool:
        """Whether the database is away now (a wait failed, and none succeeded since)."""
        return self._since is not None

    def shut(self) -> float | None:
        """``None`` when a wait may go on (no outage, one still waited for, or the one try in
        each `OUTAGE_S` past it: this caller's), else how long the outage has lasted."""
        if self._since is None:  # the hit path: one attribute read
            return None
        now = time.monotonic()
        with self._lock:
            since = self._since
            if since is None or now - since < self.timeouts.outage_s:
                return None
            if now - self._tried >= self.timeouts.outage_s:
                self._tried = now
                return None
            return now - since

    def failed(self, started: float) -> None:
        """A wait that began at ``started`` (``time.monotonic()``) found the database away."""
        with self._lock:
            if self._since is None:
                self._since = started
            self._tried = time.monotonic()

    def answered(self) -> None:
        """The database answered: the outage, if any, is over."""
        self.reached = True
        if self._since is not None:
            with self._lock:
                self._since = None


class Watched(Protocol):
    """A connection the watchdog watches: ``deadline`` is when its wait in progress is cut
    (0: none in progress), and the watchdog sets ``was_cut`` when it cuts."""

    deadline: float
    was_cut: bool

    @property
    def closed(self) -> bool: ...

    def fileno(self) -> int: ...


class Watchdog:
    """One thread per process that cuts the socket of a wait that outlived its deadline, so
    that the waiting thread gets an error instead of waiting for a server that does not run.

    A wait only writes its connection's ``deadline`` (the hit path pays that, no lock); the
    thread looks at every watched connection each `TICK_S`, and ends when none is left.
    """

    TICK_S = 0.05

    def __init__(self) -> None:
        self._watched: weakref.WeakSet[Watched] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, connection: Watched) -> None:
        """Watch a new connection's waits for as long as it lives."""
        with self._lock:
            self._watched.add(connection)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="embeddingcache-db-watchdog", daemon=True
                )
                self._thread.start()

    def forked(self) -> None:
        """In a forked child: no thread runs, and nothing of the parent's is watched."""
        self._watched, self._lock, self._thread = weakref.WeakSet(), threading.Lock(), None

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK_S)
            with self._lock:
                watched = list(self._watched)
                if not watched:
                    self._thread = None
                    return
            now = time.monotonic()
            for connection in watched:
                deadline = connection.deadline
                # Read again just before the cut: a wait that ended meanwhile is left alone
                # (one that ends between the two reads finds its idle connection cut, and
                # its next use reconnects, as after any dropped connection).
                if 0 < deadline <= now and connection.deadline:
                    connection.was_cut = True
                    cut(connection)


def cut(connection: Watched) -> None:
    """Shut a connection's socket down both ways, through a duplicate of its descriptor: the
    driver's pending read returns at once with "server closed the connection", and its
    descriptor stays the driver's to close."""
    try:
        if connection.closed:
            return  # nothing waits on it
        duplicate = socket.socket(fileno=os.dup(connection.fileno()))
    except Exception:  # closed meanwhile (the driver's own error, or the OS's)
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more: the wait has ended
    finally:
        duplicate.close()


WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG.forked)
