"""Retrying writes on transient database errors, and only on those.

Exponential backoff with jitter, bounded both by attempts and by total time; the last error is
re-raised as itself, so callers never see tenacity's ``RetryError``. Tests set ``WAIT_SCALE``
to 0 to remove the waits.

Transient: SQLite's locks; Postgres serialization failures and deadlocks; and, for a Postgres
database this process reached before, the database away (issue 30): a dropped connection, a
refused connect, a server starting up or shutting down, one that did not answer in time
(`embeddingcache.storage.timeouts`). How long an outage is waited for in all is the
timeouts' business (``EMBEDDING_CACHE_DB_OUTAGE_S``); an error marked `NotRetried` never is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity
from sqlalchemy import exc as sa_exc

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_SECONDS",
    "WAIT_SCALE",
    "NotRetried",
    "is_away",
    "is_transient",
    "retry_write",
]

logger = logging.getLogger("embeddingcache.storage")

MAX_ATTEMPTS = 10
MAX_SECONDS = 60.0
WAIT_SCALE = 1.0

# SQLSTATEs that mean "try the same transaction again": serialization failure, deadlock.
_RETRY_SQLSTATES = {"40001", "40P01"}
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy")
# A Postgres server away: admin_shutdown, crash_shutdown, cannot_connect_now, and the
# connection_exception class (08...).
_AWAY_SQLSTATES = {"57P01", "57P02", "57P03"}
# The same where the driver has no SQLSTATE to give: psycopg's errors on connect (a refused
# connection, a server starting up, a connect timeout) and on a connection cut under it.
_AWAY_MESSAGES = (
    "connection refused",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "server closed the connection unexpectedly",
    "connection timeout expired",
    "did not answer within",  # timeouts.py's own, for a server that stopped answering
)


class NotRetried:
    """A mixin for a database error that is not to be retried, whatever its kind: a
    connection refused by a database this process never reached (a wrong URL, more likely
    than an outage), or one refused at once because the database has been away for longer
    than it is waited for (see `embeddingcache.storage.timeouts`)."""


T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write is worth trying again as it was."""
    if not isinstance(exc, sa_exc.DBAPIError) or isinstance(exc.orig, NotRetried):
        return False
    if exc.connection_invalidated or is_away(exc.orig):
        return True
    if getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    message = str(exc.orig).lower()
    return isinstance(exc, sa_exc.OperationalError) and any(
        marker in message for marker in _SQLITE_TRANSIENT
    )


def is_away(error: BaseException | None) -> bool:
    """Whether a driver's error says the Postgres server is away (down, restarting, not
    answering, or the connection to it lost), rather than that the statement failed."""
    if error is None or isinstance(error, NotRetried):
        return False
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _AWAY_SQLSTATES or sqlstate.startswith("08")
    message = str(error).lower()
    return any(marker in message for marker in _AWAY_MESSAGES)


def _log_retry(state: tenacity.RetryCallState) -> None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    logger.info("write failed (%s); attempt %d, retrying", error, state.attempt_number)


def retry_write(fn: Callable[[], T]) -> T:
    """Call ``fn`` until it succeeds, a non-transient error occurs, or the bounds run out."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_attempt(MAX_ATTEMPTS) | tenacity.stop_after_delay(MAX_SECONDS),
        # A floor under each pause, and jitter above it: the ten attempts at a database that
        # refuses at once (a restart) then span 9 s at least. Full jitter (uniform from 0 to
        # the same caps) spans 4.6 s on average, and under 3.5 s for about 1 write in 6,
        # which a restart of 3 s would outlast (issue 30).
        wait=tenacity.wait_exponential(multiplier=0.05 * WAIT_SCALE, max=2.0 * WAIT_SCALE)
        + tenacity.wait_random(0, 0.25 * WAIT_SCALE),
        before_sleep=_log_retry,
        reraise=True,
    )
    return retrying(fn)
