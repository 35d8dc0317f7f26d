"""Retrying writes on transient database errors, and only on those.

Exponential backoff with jitter, bounded both by attempts and by total time; the last error is
re-raised as itself, so callers never see tenacity's ``RetryError``. Tests set ``WAIT_SCALE``
to 0 to remove the waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity
from sqlalchemy import exc as sa_exc

__all__ = ["MAX_ATTEMPTS", "MAX_SECONDS", "WAIT_SCALE", "is_transient", "retry_write"]

logger = logging.getLogger("embeddingcache.storage")

MAX_ATTEMPTS = 10
MAX_SECONDS = 60.0
WAIT_SCALE = 1.0

# SQLSTATEs that mean "try the same transaction again": serialization failure, deadlock.
_RETRY_SQLSTATES = {"40001", "40P01"}
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy")

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write is worth trying again as it was."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    message = str(exc.orig).lower()
    return isinstance(exc, sa_exc.OperationalError) and any(
        marker in message for marker in _SQLITE_TRANSIENT
    )


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
