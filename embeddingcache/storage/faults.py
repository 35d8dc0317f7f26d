"""Which storage errors are faults of the machine, which pass, and which are mistakes to fix.

A full disk is a fault: the same call works once room is made, whatever the process has done
before (issue 30). A wrong path, a permission, a wrong URL or password is a mistake, which the
pipeline reports as an error when storage never worked (see `pipeline.policy`). The drivers'
own codes decide, found anywhere along the error's causes:

- SQLite's ``SQLITE_FULL`` ("database or disk is full"), and ``SQLITE_IOERR_SHMSIZE``: the
  ``-shm`` file beside a database in WAL mode could not be given its pages, which on a full
  disk fails every read of a process that opens the file first (measured on a full tmpfs).
- ``OSError`` ``ENOSPC`` or ``EDQUOT``: creating the directory. SQLite says "unable to open
  database file" whatever kept it from creating a file or a log, so a directory whose file
  system has no room or no free inode left says it instead (`out_of_room`).
- Postgres's class 53, insufficient resources: ``disk_full`` (53100), ``out_of_memory``
  (53200), ``too_many_connections`` (53300). Not 53400, a configured limit to raise.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["disk_full", "is_fault", "no_room", "out_of_room"]

SQLITE_IOERR = 10
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_IOERR_SHMSIZE = 4874  # SQLITE_IOERR | (19 << 8)
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
PG_DISK_FULL = "53100"
PG_PASSING = frozenset({PG_DISK_FULL, "53200", "53300"})
# Less room than one write of a shard needs: a log frame of a 16 KiB page, and the first
# 32 KiB of a -shm file (a full tmpfs showed 8 KiB free where SQLite reported it full).
ROOM_BYTES = 64 * 1024


def no_room(exc: BaseException) -> bool:
    """Whether ``exc``, or an error behind it, says the disk (or a quota) is full."""
    return any(_no_room(cause) for cause in _causes(exc))


def disk_full(exc: BaseException, out_of_room: Callable[[], bool]) -> bool:
    """Whether ``exc`` came of a full disk: `no_room` says so, or SQLite could not open or
    write a file where ``out_of_room()`` (the layout's: see `out_of_room`)."""
    return no_room(exc) or (_cannot_open_or_write(exc) and out_of_room())


def is_fault(exc: BaseException, out_of_room: Callable[[], bool]) -> bool:
    """Whether ``exc`` is a fault that passes (a `disk_full`, or a Postgres short of memory
    or connections) rather than a mistake in the configuration."""
    passing = any(_sqlstate(cause) in PG_PASSING for cause in _causes(exc))
    return passing or disk_full(exc, out_of_room)


def _cannot_open_or_write(exc: BaseException) -> bool:
    """Whether SQLite could not open or write a file (``SQLITE_CANTOPEN``, ``SQLITE_IOERR``)."""
    codes = (SQLITE_CANTOPEN, SQLITE_IOERR)
    return any(
        isinstance(cause, sqlite3.Error)
        and ((getattr(cause, "sqlite_errorcode", 0) or 0) & 0xFF) in codes
        for cause in _causes(exc)
    )


def out_of_room(directory: Path) -> bool:
    """Whether the file system of ``directory`` (or of its nearest existing parent) has less
    than `ROOM_BYTES` free, or no free inode."""
    path = directory
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        found = os.statvfs(path)
    except OSError:
        return False
    # f_files is 0 where a file system has no inode limit (btrfs): no inode to run out of.
    no_inode = found.f_files > 0 and found.f_favail == 0
    return found.f_bavail * found.f_frsize < ROOM_BYTES or no_inode


def _no_room(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF == SQLITE_FULL or code == SQLITE_IOERR_SHMSIZE)
    if isinstance(exc, OSError):
        return exc.errno in NO_ROOM_ERRNOS
    return _sqlstate(exc) == PG_DISK_FULL


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a Postgres driver's error (psycopg 3, or psycopg2's ``pgcode``)."""
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return code if isinstance(code, str) else None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every error behind it: causes, contexts, and a SQLAlchemy error's driver
    error (``orig``), each once."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for behind in (getattr(current, "orig", None), current.__cause__, current.__context__):
            if isinstance(behind, BaseException):
                pending.append(behind)
